"""Bug zoo for pipeline parallelism: classic mistakes, monkeypatched into the executor,
each of which the parity check against the serial run must catch (on every rank at once).

    loss not divided by M        each micro-batch's backward starts from S, not S/M
    wrong micro-batch            micro-batch 1's received activation kept as micro-batch 0's
    tied grads not summed        first and last stage each keep half of dL/dwte
    W step skipped               micro-batch 0's queued weight gradients are dropped
"""
import numpy as np
import pytest

from minipar import parity
from minipar.autograd import Tensor
from minipar.data import ReverseTask
from minipar.dist.grid import ProcessGrid
from minipar.engine import Engine, Layout, OptimConfig
from minipar.nn import GPTConfig
from minipar.parallel import pipeline
from minipar.parallel.schedules import Action

pytestmark = [pytest.mark.mpi, pytest.mark.pp]
SEED, TASK, OPTIM = 5, ReverseTask(n_digits=4), OptimConfig(lr=1e-2)


def run_against_serial(group, schedule, m=2):
    """One training step of a 2-stage pipeline and of the serial run; the collective verdict."""
    cfg = GPTConfig(vocab_size=11, seq_len=8, n_layer=2, n_head=2, d_model=8,
                    tied_embeddings=True, precision="fp64")
    layout = Layout(pp=2, micro_batches=m, schedule=schedule)
    engine = Engine(cfg, layout, OPTIM, SEED, ProcessGrid(group, 1, 2, 1))
    serial = Engine(cfg, optim=OPTIM, seed=SEED)
    loss, expected = engine.train_step(0, TASK, 2 * m), serial.train_step(0, TASK, 2 * m)
    return parity.check(group, parity.compare_models(engine, serial), parity.TOLERANCE["fp64"],
                        " after one step", loss=(loss, expected))


def loss_not_divided(loss, loss_scale, m):
    return np.asarray(loss_scale, dtype=loss.data.dtype)       # forgot the 1/M


def stored_under_wrong_microbatch(self, run, a):
    """Receives the partner micro-batch's activation (0 <-> 1) and keeps it as a.mb's input.
    Run under GPipe, where stage 0 sends both forwards before it waits: no deadlock."""
    partner = Action(a.op, a.mb ^ 1, a.chunk)
    run.inputs[a.mb, a.chunk] = Tensor(self._receive(run, partner), requires_grad=True)


def tied_grads_not_summed(self):
    pass


def weight_step_skipped(self, run, a):
    queue = run.wgrads.pop((a.mb, a.chunk))
    if a.mb != 0:                                                        # mb 0's dW are lost
        for work in queue:
            work()


BUGS = {   # name -> (attribute of the pipeline module to replace, replacement, schedule)
    "loss not divided across micro-batches": ("loss_gradient", loss_not_divided, "1f1b"),
    "received activation stored under the wrong micro-batch":
        ("Pipeline._recv_forward", stored_under_wrong_microbatch, "gpipe"),
    "tied-embedding gradients not summed": ("Pipeline.sync_tied_grads", tied_grads_not_summed, "1f1b"),
    "a W step skipped": ("Pipeline._weight", weight_step_skipped, "zb-h1"),
}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_the_unpatched_pipeline_passes(group_of, schedule):
    run_against_serial(group_of(2), schedule)        # the control: parity.check would raise


@pytest.mark.parametrize("bug", list(BUGS))
def test_the_parity_check_catches(group_of, monkeypatch, bug):
    name, replacement, schedule = BUGS[bug]
    owner, _, attr = name.rpartition(".")
    monkeypatch.setattr(getattr(pipeline, owner) if owner else pipeline, attr, replacement)
    with pytest.raises(parity.ParityError):
        run_against_serial(group_of(2), schedule)
