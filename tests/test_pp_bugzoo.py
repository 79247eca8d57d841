"""Bug zoo for pipeline parallelism: classic mistakes, monkeypatched into the executor,
each of which the parity check against the serial run must catch (on every rank at once).

    loss not divided by M        each micro-batch's backward starts from S, not S/M
    wrong micro-batch            micro-batch 1's received activation kept as micro-batch 0's
    tied grads not summed        first and last stage each keep half of dL/dwte
    W step skipped               micro-batch 0's queued weight gradients are dropped
    receive buffer reused        one buffer per direction serves every micro-batch (the peer
                                 ShallowSpeed's real bug): the next receive overwrites an
                                 activation a B still needs, or a gradient a deferred W still
                                 reads. Invisible at p = 2 (rank 0 runs each W right after its
                                 B), and under 1F1B (a Block saves what it derives from its
                                 input, and each received gradient is used at once): caught by
                                 ZB-H1 at p = 3, m = 3, whose middle stage defers W steps that
                                 read the received gradients.
"""
import numpy as np
import pytest

from minipar import parity
from minipar.autograd import Tensor
from minipar.data import ReverseTask
from minipar.comm.grid import ProcessGrid
from minipar.engine import Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.nn import GPTConfig
from minipar.parallel.pipeline import executor as pipeline
from minipar.parallel.pipeline.schedules import Action

pytestmark = [pytest.mark.mpi, pytest.mark.pp]
SEED, TASK, OPTIM = 5, ReverseTask(n_digits=4), OptimConfig(lr=1e-2)


def run_against_serial(group, device, schedule, m=2):
    """One training step of a pipeline over `group` and of the serial run in lockstep
    (minipar/lockstep.py): the collective verdict."""
    p = group.size
    cfg = GPTConfig(vocab_size=11, seq_len=8, n_layer=p, n_head=2, d_model=8,
                    tied_embeddings=True, precision="fp64")
    layout = Layout(pp=p, micro_batches=m, schedule=schedule)
    return lockstep(cfg, layout, TASK, 2 * m, steps=1, grid=ProcessGrid(group, 1, p, 1), optim=OPTIM, seed=SEED,
                    device=device).worst


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


def receive_into_one_buffer(self, run, action):
    """BUG: one receive buffer per direction and shape, reused by every micro-batch."""
    shape = self.activation_shape(len(run.micro[action.mb]), run.task.seq_len)
    kept = self.__dict__.setdefault("_kept_buffers", {})
    buf = kept.setdefault((action.op, shape), self.xp.empty(shape, dtype=self.compute_dtype))
    # recv: one micro-batch's activation (or its gradient), b*T*C elements, over pp: into the SAME buffer
    return self.pp.recv_(buf, source=self._peer(action), tag=self._tag(action))


BUGS = {   # name -> (attribute of the pipeline module to replace, replacement, schedule, p, m)
    "loss_not_divided_across_micro_batches": ("loss_gradient", loss_not_divided, "1f1b", 2, 2),
    "received_activation_stored_under_the_wrong_micro_batch":
        ("Pipeline._recv_forward", stored_under_wrong_microbatch, "gpipe", 2, 2),
    "tied_embedding_gradients_not_summed": ("Pipeline.sync_tied_grads", tied_grads_not_summed, "1f1b", 2, 2),
    "a_w_step_skipped": ("Pipeline._weight", weight_step_skipped, "zb-h1", 2, 2),
    "a_receive_buffer_reused_across_micro_batches": ("Pipeline._receive", receive_into_one_buffer,
                                                     "zb-h1", 3, 3),
}


@pytest.mark.parametrize("schedule,p,m", [("gpipe", 2, 2), ("1f1b", 2, 2), ("zb-h1", 2, 2),
                                          ("1f1b", 3, 3), ("zb-h1", 3, 3)])
def test_the_unpatched_pipeline_passes(pipeline_group, device, schedule, p, m):
    run_against_serial(pipeline_group(p), device, schedule, m)   # the control: parity.check would raise


def caught(world, pipeline_group, device, monkeypatch, bug):
    """Plant `bug`; the check of the control's run must raise ParityError (on every rank)."""
    name, replacement, schedule, p, m = BUGS[bug]
    group = pipeline_group(p)
    owner, _, attr = name.rpartition(".")
    monkeypatch.setattr(getattr(pipeline, owner) if owner else pipeline, attr, replacement)
    with pytest.raises(parity.ParityError, match="parity failed") as caught:
        run_against_serial(group, device, schedule, m)
    if group.rank == 0 and world.rank == 0:
        print(f"\n  {bug}: {caught.value}")            # what a student sees (pytest -s)


def test_catches_loss_not_divided_across_micro_batches(world, pipeline_group, device, monkeypatch):
    caught(world, pipeline_group, device, monkeypatch, "loss_not_divided_across_micro_batches")


def test_catches_received_activation_stored_under_the_wrong_micro_batch(world, pipeline_group, device, monkeypatch):
    caught(world, pipeline_group, device, monkeypatch, "received_activation_stored_under_the_wrong_micro_batch")


def test_catches_tied_embedding_gradients_not_summed(world, pipeline_group, device, monkeypatch):
    caught(world, pipeline_group, device, monkeypatch, "tied_embedding_gradients_not_summed")


def test_catches_a_w_step_skipped(world, pipeline_group, device, monkeypatch):
    caught(world, pipeline_group, device, monkeypatch, "a_w_step_skipped")


def test_catches_a_receive_buffer_reused_across_micro_batches(world, pipeline_group, device, monkeypatch):
    caught(world, pipeline_group, device, monkeypatch, "a_receive_buffer_reused_across_micro_batches")


def test_every_mistake_has_its_test():
    assert {f"test_catches_{bug}" for bug in BUGS} <= set(globals())
