# PYTHONPATH=. OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 8 .venv/bin/python -m mpi4py -m pytest -m mpi -p no:cacheprovider -q tests/test_3d.py
"""3D parallelism: dp x pp x tp (with SP, every schedule, ZeRO) composes into the serial run.

Each strategy has its own parity suite; this file checks that they compose. One
Engine narrows the full serial GPT three ways at once (TP shard -> pipeline stage
-> DDP / ZeRO over dp), and after every step its loss, gradients, parameters and
Adam m, v must equal the serial Engine's slice of them (parity.check, a collective
verdict over the block of ranks).

* a fixed composability matrix on 8 ranks: every row always runs, so the
  combinations people actually launch (the default 2 x 2 x 2 job, SP, ZB-H1 with
  ZeRO-2, interleaved, clipping, mixed precision, untied, dropout) are never left
  to chance;
* hypothesis: every factorisation n = dp * pp * tp of a block of n in {1, 2, 4, 8}
  ranks, crossed with a schedule, a ZeRO stage and SP, drawn only where valid;
* invalid layouts raise ValueError on every rank before any collective;
* the bug zoo: a 3D run that skips the tied-embedding gradient sum must fail parity.
"""

import pytest
from hypothesis import given, settings, strategies as st

from minipar import parity
from minipar.data import ReverseTask
from minipar.comm.group import Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.nn import GPTConfig
from minipar.parallel.pipeline.executor import Pipeline

pytestmark = [pytest.mark.mpi, getattr(pytest.mark, "3d")]

WORLD = Group.world().size
SEED, TASK = 11, ReverseTask(n_digits=4)       # token ids < 11, sequences of T = 8 tokens
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)
CLIP = OptimConfig(lr=1e-2, weight_decay=0.1, max_norm=0.05)   # the clip is active at this size
# mixed precision: Adam's first steps are about lr * sign(g), so where fp16 rounding flips the
# sign of a near-zero gradient a weight moves by 2 lr (0.3 of max|W| at lr 1e-2, even under
# plain DP). A small lr keeps that honest noise inside TOLERANCE["mixed"]; a real bug still
# moves whole gradients.
MIXED = OptimConfig(lr=1e-3, weight_decay=0.1)


def config(tp=1, n_layer=4, **kw):
    """A tiny GPT every layout here can split: n_head and vocab_size divisible by tp."""
    base = dict(vocab_size=16, seq_len=8, n_layer=n_layer, n_head=max(4, tp), d_model=16,
                precision="fp64")
    return GPTConfig(**{**base, **kw})


def run(grid, device, cfg, layout, batch, optim=OPTIM, tol=None, steps=2):
    """lockstep (minipar/lockstep.py) of the 3D run and the serial one: a collective parity
    verdict after every step on the loss, grads, params, m, v and the global gradient norm."""
    return lockstep(cfg, layout, TASK, batch, steps, grid=grid, optim=optim, seed=SEED, tol=tol,
                    device=device).worst


def report(world, name, worst):
    """Print the worst error once per job (world rank 0), visible with `pytest -s`."""
    if world.rank == 0:
        print(f"\n[3d] {name}: max rel err {worst:.2e}")


# ----------------------------------------------------------------------------- the matrix
# (id, grid (dp, pp, tp), Layout extras, GPTConfig extras, optimizer, tolerance key, batch)
MATRIX = [
    ("default-dp2-pp2-tp2-1f1b-zero1", (2, 2, 2), dict(zero=1, micro_batches=4), {}, OPTIM, "fp64", 8),
    ("default+sp", (2, 2, 2), dict(zero=1, micro_batches=4, sequence_parallel=True), {}, OPTIM, "fp64", 8),
    ("zb-h1-zero2", (2, 2, 2), dict(zero=2, micro_batches=4, schedule="zb-h1"), {}, OPTIM, "fp64", 8),
    ("gpipe-zero0", (2, 2, 2), dict(zero=0, micro_batches=4, schedule="gpipe"), {}, OPTIM, "fp64", 8),
    ("interleaved-v2-zero1", (2, 2, 2), dict(zero=1, micro_batches=4, schedule="interleaved",
                                             virtual_stages=2), {}, OPTIM, "fp64", 8),
    ("tp4-dp2-sp", (2, 1, 4), dict(micro_batches=2, sequence_parallel=True), {}, OPTIM, "fp64", 8),
    ("pp4-dp2-zb-h1", (2, 4, 1), dict(micro_batches=4, schedule="zb-h1"), {}, OPTIM, "fp64", 8),
    ("pp2-tp4", (1, 2, 4), dict(micro_batches=4), {}, OPTIM, "fp64", 8),
    ("dp8-zero3", (8, 1, 1), dict(zero=3), {}, OPTIM, "fp64", 8),
    ("clip-dp2-pp2-tp2-zero1", (2, 2, 2), dict(zero=1, micro_batches=4), {}, CLIP, "fp64", 8),
    ("mixed-dp2-pp2-tp2-zero1", (2, 2, 2), dict(zero=1, micro_batches=4), dict(precision="mixed"),
     MIXED, "mixed", 8),
    ("untied-dp2-pp2-tp2", (2, 2, 2), dict(micro_batches=4), dict(tied_embeddings=False), OPTIM, "fp64", 8),
    ("dropout-dp2-pp2-tp2", (2, 2, 2), dict(micro_batches=4), dict(dropout=0.1), OPTIM, "fp64", 8),
]


@pytest.mark.parametrize("name, dims, lay, cfg_kw, optim, tol, batch", MATRIX, ids=[r[0] for r in MATRIX])
def test_composability_matrix(world, grid_of, device, name, dims, lay, cfg_kw, optim, tol, batch):
    if WORLD < 8:
        pytest.skip("the composability matrix runs on 8 ranks")
    dp, pp, tp = dims
    grid = grid_of(dp, pp, tp)
    worst = run(grid, device, config(tp, **cfg_kw), Layout(dp=dp, pp=pp, tp=tp, **lay), batch,
                optim, parity.TOLERANCE[tol])
    report(world, name, worst)


# ----------------------------------------------------------------------------- property-based
def divisors(n):
    """Largest first: hypothesis tries early entries most, and the big splits are the 3D ones."""
    return [d for d in range(n, 0, -1) if n % d == 0]


@st.composite
def layouts(draw):
    """A valid (dp, pp, tp, Layout extras, batch) over n in {1, 2, 4, 8} ranks dividing the job.
    Only valid combinations are drawn, so every rank (same derandomized draws) runs the same."""
    n = draw(st.sampled_from([k for k in (8, 4, 2, 1) if WORLD % k == 0]), label="n")
    tp = draw(st.sampled_from(divisors(n)), label="tp")
    pp = draw(st.sampled_from(divisors(n // tp)), label="pp")
    dp = n // (tp * pp)
    schedule = draw(st.sampled_from((["interleaved"] if pp > 1 else []) + ["zb-h1", "1f1b", "gpipe"]),
                    label="schedule")
    v = 2 if schedule == "interleaved" else 1
    m = pp if schedule == "interleaved" else draw(st.integers(1, 2), label="m")
    zero = draw(st.sampled_from(([3] if pp == tp == 1 else []) + [2, 1, 0]), label="zero")
    sp = draw(st.booleans(), label="sp") if tp > 1 else False
    lay = dict(schedule=schedule, virtual_stages=v, micro_batches=m, zero=zero, sequence_parallel=sp)
    return dp, pp, tp, lay, dp * m * draw(st.integers(1, 2), label="b")


@settings(max_examples=8)
@given(drawn=layouts())
def test_any_factorisation_schedule_zero_and_sp_equals_serial(world, grid_of, device, drawn):
    dp, pp, tp, lay, batch = drawn
    grid = grid_of(dp, pp, tp)
    cfg = config(tp, n_layer=max(4, pp * lay["virtual_stages"]))
    worst = run(grid, device, cfg, Layout(dp=dp, pp=pp, tp=tp, **lay), batch)
    report(world, f"dp{dp} pp{pp} tp{tp} {lay} batch {batch}", worst)


# ----------------------------------------------------------------------------- invalid layouts
INVALID = [  # (id, grid, Layout extras, GPTConfig extras, words of the message)
    ("zero3-with-tp", (2, 1, 2), dict(zero=3), {}, "ZeRO-3"),
    ("zero3-with-pp", (2, 2, 1), dict(zero=3, micro_batches=2), {}, "ZeRO-3"),
    ("fewer-layers-than-stages", (1, 4, 1), dict(micro_batches=4), dict(n_layer=2), "--n-layer 2 cannot fill 4 pipeline stages"),
    ("interleaved-m-not-multiple-of-p", (1, 2, 1), dict(schedule="interleaved", virtual_stages=2,
                                                      micro_batches=3), {}, "multiple of --pp 2"),
    ("heads-not-divisible-by-tp", (1, 1, 4), {}, dict(n_head=2, d_model=16), "--tp 4 does not divide --n-head 2"),
    ("vocab-not-divisible-by-tp", (1, 1, 4), {}, dict(vocab_size=18), "--tp 4 does not divide the vocabulary of 18"),
]


@pytest.mark.parametrize("name, dims, lay, cfg_kw, words", INVALID, ids=[r[0] for r in INVALID])
def test_invalid_layout_raises_before_any_collective(grid_of, device, name, dims, lay, cfg_kw, words):
    dp, pp, tp = dims
    grid = grid_of(dp, pp, tp)
    mark = grid.world.ledger.snapshot()
    try:
        Engine(config(tp, **cfg_kw), Layout(dp=dp, pp=pp, tp=tp, **lay), OPTIM, SEED, grid, device=device)
        error = None
    except ValueError as err:
        error = err
    calls = grid.world.ledger.since(mark).entries
    agree(grid.world, error is not None and words in str(error),
          f"{name}: expected ValueError mentioning {words!r}, got {error!r}")
    agree(grid.world, not calls, f"{name}: {len(calls)} communication calls before the error: {calls}")


def test_grid_that_does_not_tile_the_ranks_is_refused(group_of):
    group = group_of(2 if WORLD >= 2 else 1)
    with pytest.raises(ValueError, match="does not match"):
        ProcessGrid(group, 2, 2, 2)


# ----------------------------------------------------------------------------- bug zoo
def test_catches_the_tied_embedding_sum_skipped(grid_of, device, monkeypatch):
    """Under pp > 1 the first and last stage each hold part of dL/dwte; forget to add them
    (a classic 3D bug: DP and TP are right, the pipeline's tie is not) and parity must fail."""
    if WORLD < 8:
        pytest.skip("runs the default 2 x 2 x 2 job")
    monkeypatch.setattr(Pipeline, "sync_tied_grads", lambda self: None)
    with pytest.raises(parity.ParityError, match="only the tied embedding's gradient differs"):
        run(grid_of(2, 2, 2), device, config(2), Layout(dp=2, pp=2, tp=2, zero=1, micro_batches=4), 8, steps=1)
