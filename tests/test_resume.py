"""Any layout resumes any checkpoint: a property test over (save layout, resume layout) pairs.

Layout A trains K steps, saves, trains J more and saves again: the uninterrupted run and
its final state. Layout B (any world size that fits) loads the step-K checkpoint and trains
the same J steps, then saves. B's J losses and every array of B's final checkpoint
(parameters, master weights, Adam m and v, assembled to serial shape) must equal A's:
bit-identical when B is A, within fp64 rounding (TOL) otherwise. Layouts: dp, tp, tp+SP,
pp with each schedule, ZeRO 1/2/3, Offload, 3D and the train job's default layouts;
fp32 and mixed resume into their own layout (bit-identical). Checkpoints go through
minipar.checkpoint exactly as `minipar.train --save/--resume` does.

    mpiexec -n 8 python -m mpi4py -m pytest -m mpi tests/test_resume.py
"""
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minipar import checkpoint
from minipar.data import ReverseTask
from minipar.comm.group import Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree
from minipar.engine import Engine, Layout, OptimConfig
from minipar.manifest import read_manifest
from minipar.nn import GPTConfig
from minipar.parity import rel_err
from minipar.reshard import Reader, assemble

pytestmark = [pytest.mark.mpi, pytest.mark.dp, pytest.mark.tp, pytest.mark.pp, pytest.mark.zero,
              pytest.mark.offload, getattr(pytest.mark, "3d")]

TASK = ReverseTask(n_digits=4, seed=0)             # T = 8, 11 tokens
BATCH, K, J = 8, 2, 2                              # global batch; steps before / after the save
OPTIM = OptimConfig(lr=1e-2, max_norm=1.0)
TOL = 1e-10                                        # another layout: fp64 reduction order only
LAYOUTS = {
    "serial": Layout(),
    "dp2": Layout(dp=2),
    "dp2-zero1": Layout(dp=2, zero=1),
    "dp2-zero2": Layout(dp=2, zero=2, bucket_bytes=4096),
    "dp2-zero3": Layout(dp=2, zero=3),
    "dp2-zero2-offload": Layout(dp=2, zero=2, offload=True),
    "dp2-offload": Layout(dp=2, offload=True),
    "dp4-zero3": Layout(dp=4, zero=3),
    "tp2": Layout(tp=2),
    "tp2-sp": Layout(tp=2, sequence_parallel=True),
    "pp2-1f1b": Layout(pp=2, micro_batches=2),
    "pp2-gpipe": Layout(pp=2, schedule="gpipe", micro_batches=4),
    "pp2-zb-h1": Layout(pp=2, schedule="zb-h1", micro_batches=2),
    "pp2-interleaved": Layout(pp=2, schedule="interleaved", micro_batches=2, virtual_stages=2),
    "dp2-tp2-zero2": Layout(dp=2, tp=2, zero=2),
    "dp2-pp2-zero1": Layout(dp=2, pp=2, zero=1, micro_batches=2),
    "pp2-tp2-sp": Layout(pp=2, tp=2, sequence_parallel=True, micro_batches=2),
    # the train job's defaults (minipar.train with no layout flags) at 1, 2, 4 and 8 ranks
    "default1": Layout(),
    "default2": Layout(dp=2, zero=1),
    "default4": Layout(dp=2, tp=2, zero=1),
    "default8": Layout(dp=2, pp=2, tp=2, zero=1, micro_batches=4),
}


FITS = sorted(name for name, lay in LAYOUTS.items() if lay.world_size <= Group.world().size)


def config(precision):
    return GPTConfig(vocab_size=16, seq_len=TASK.seq_len, n_layer=4, n_head=2, d_model=16, precision=precision)


@pytest.fixture(scope="module")
def job(world):
    """(first(n): the group of world ranks 0..n-1, None on the others; a shared tmp dir)."""
    groups = {n: world.split(color=int(world.rank >= n), key=world.rank, name=f"first{n}")
              for n in sorted({LAYOUTS[name].world_size for name in FITS})}
    tmp = world.bcast_object(tempfile.mkdtemp(prefix="minipar-resume-") if world.rank == 0 else None)
    yield (lambda n: groups[n] if world.rank < n else None), tmp
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def run(first, device, layout, precision, start, stop, resume=None, saves=None):
    """Train `layout` on the first ranks for steps [start, stop), after loading `resume`;
    saves = {step: path}. The losses on the ranks that ran, else None."""
    group = first(layout.world_size)
    if group is None:
        return None
    grid = ProcessGrid(group, layout.dp, layout.pp, layout.tp) if layout.world_size > 1 else None
    engine = Engine(config(precision), layout, OPTIM, seed=3, grid=grid, device=device)
    if resume is not None:
        assert checkpoint.load(resume, engine) == start
    losses = []
    for step in range(start, stop):
        losses.append(engine.train_step(step, TASK, BATCH))
        if step + 1 in (saves or {}):
            checkpoint.save(saves[step + 1], engine, step + 1, group)
    return losses


def arrays(path, precision):
    """{(kind, name): the serial array} of a checkpoint."""
    manifest = read_manifest(path, config(precision))
    keys = sorted({(e["kind"], e["name"]) for e in manifest["slices"]})
    with Reader(path) as reader:
        return {key: assemble(path, manifest, *key, reader) for key in keys}


def differences(a_losses, b_losses, a_path, b_path, exact, precision="fp64"):
    """[(what, error)] where B's run is not A's (exactly, or within TOL)."""
    bad = []
    close = (lambda x, y: np.array_equal(x, y)) if exact else (lambda x, y: rel_err(x, y) <= TOL)
    if not close(np.array(b_losses), np.array(a_losses)):
        bad.append(("losses", b_losses, a_losses))
    a, b = arrays(a_path, precision), arrays(b_path, precision)
    if set(a) != set(b):
        bad.append(("saved arrays", sorted(set(a) ^ set(b))))
    for key in sorted(set(a) & set(b)):
        if not close(b[key], a[key]):
            bad.append((f"{key[0]} {key[1]}", rel_err(b[key], a[key])))
    return bad[:4] + ([f"... and {len(bad) - 4} more"] if len(bad) > 4 else [])


PRECISIONS = ("fp64", "fp64", "fp64", "fp32", "mixed")   # others resume into their own layout


@pytest.mark.timeout(600)                                  # 6 examples of three short runs each
@settings(max_examples=4)
@given(save=st.sampled_from(FITS), resume=st.sampled_from(FITS), precision=st.sampled_from(PRECISIONS))
@example(save="dp2-zero3", resume="serial", precision="fp64")     # the case, every run
@example(save="default4", resume="default4", precision="mixed")
def test_any_layout_resumes_any_checkpoint(job, world, device, save, resume, precision):
    first, tmp = job
    if save not in FITS or resume not in FITS:             # an explicit example for a bigger job
        return
    resume = resume if precision == "fp64" else save
    where = os.path.join(tmp, f"{save}-{resume}-{precision}")
    at_k, full, resumed = where + "-k", where + "-full", where + "-resumed"
    a_losses = run(first, device, LAYOUTS[save], precision, 0, K + J, saves={K: at_k, K + J: full})
    world.barrier()                                        # A's checkpoint is on disk
    b_losses = run(first, device, LAYOUTS[resume], precision, K, K + J, resume=at_k, saves={K + J: resumed})
    world.barrier()
    bad = differences(a_losses[K:], b_losses, full, resumed, save == resume, precision) if world.rank == 0 else []
    agree(world, not bad, f"saved under {save}, resumed under {resume} ({precision}): {bad}")


@pytest.mark.parametrize("save, resume", [("default4", "default2"), ("dp2-zero2-offload", "dp4-zero3"),
                                          ("default8", "default4")])
def test_named_pairs(job, world, device, save, resume):
    """Pairs the issue names: ZeRO-3 into itself, and the default layouts into each other."""
    first, tmp = job
    if save not in FITS or resume not in FITS:
        pytest.skip(f"needs {max(LAYOUTS[save].world_size, LAYOUTS[resume].world_size)} ranks")
    where = os.path.join(tmp, f"named-{save}-{resume}")
    a_losses = run(first, device, LAYOUTS[save], "fp64", 0, K + J, saves={K: where + "-k", K + J: where + "-full"})
    world.barrier()
    b_losses = run(first, device, LAYOUTS[resume], "fp64", K, K + J, resume=where + "-k", saves={K + J: where + "-r"})
    world.barrier()
    bad = differences(a_losses[K:], b_losses, where + "-full", where + "-r", save == resume) \
        if world.rank == 0 else []
    agree(world, not bad, f"saved under {save}, resumed under {resume}: {bad}")
