"""The serial Engine (minipar/engine.py), the oracle of every parity test: it learns the
built-in reversal task, it is bit-for-bit reproducible from its seed, gradient
accumulation over micro-batches equals one big batch, and fp32 / mixed precision
train too. Serial (Layout() with every degree 1), no MPI."""
import numpy as np
import pytest

from minipar.backend import to_host
from minipar import parity
from minipar.data import ReverseTask
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.nn import GPTConfig

pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

TASK = ReverseTask(n_digits=4, seed=0)                                # T = 8, chance accuracy 0.1


def tiny(precision="fp64", dropout=0.0, n_layer=2):
    return GPTConfig(vocab_size=TASK.vocab_size, seq_len=TASK.seq_len, n_layer=n_layer, n_head=4,
                     d_model=32, dropout=dropout, precision=precision)


def train(engine, steps, batch=32):
    return [engine.train_step(step, TASK, batch) for step in range(steps)]


# ----------------------------------------------------------------------------- learning

def test_fp64_engine_learns_the_reversal_task(device):
    engine = Engine(tiny(), optim=OptimConfig(lr=1e-2), device=device)
    before = engine.accuracy(TASK, 256)
    losses = train(engine, 150)
    after = engine.accuracy(TASK, 256)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    assert before < 0.25 and after > 0.6, (before, after)              # chance is 0.1


@pytest.mark.parametrize("precision, dtype", [("fp32", np.float32), ("mixed", np.float16)])
def test_low_precision_engines_train_and_learn(device, precision, dtype):
    engine = Engine(tiny(precision, n_layer=1), optim=OptimConfig(lr=1e-2), device=device)
    losses = train(engine, 120)
    assert all(p.data.dtype == dtype for p in engine.params)
    assert np.isfinite(losses).all() and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert engine.accuracy(TASK, 256) > 0.5
    if precision == "mixed":
        assert engine.optimizer.master[0].dtype == np.float32 and engine.loss_scale() >= 1.0


# ----------------------------------------------------------------------------- reproducibility

def test_same_seed_gives_bitwise_identical_runs(device):
    runs = [Engine(tiny(dropout=0.1), seed=7, device=device) for _ in range(2)]
    losses = [train(engine, 4, batch=8) for engine in runs]
    assert losses[0] == losses[1]
    for (name, (p, state)), (_, (q, other)) in zip(*(e.named_state().items() for e in runs)):
        np.testing.assert_array_equal(to_host(p.data), to_host(q.data), err_msg=name)
        np.testing.assert_array_equal(to_host(state["m"]), to_host(other["m"]), err_msg=name)
    different = Engine(tiny(dropout=0.1), seed=8, device=device)
    assert train(different, 4, batch=8) != losses[0]


# ----------------------------------------------------------------------------- gradient accumulation

@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_micro_batches_equal_one_big_batch(device, dropout):
    """Four micro-batches of 4 accumulate d(loss/4): the same gradients as the batch of 16."""
    big, micro = Engine(tiny(dropout=dropout), device=device), Engine(tiny(dropout=dropout), Layout(micro_batches=4),
                                                                      device=device)
    loss_big, loss_micro = big.forward_backward(0, TASK, 16), micro.forward_backward(0, TASK, 16)
    parity.check(None, parity.compare_models(micro, big, ("grad",)), 1e-12, loss=(loss_micro, loss_big))
    # and the optimizer follows: 3 steps of both in lockstep, every quantity compared after each
    lockstep(tiny(dropout=dropout), Layout(micro_batches=4), TASK, 16, steps=3, tol=1e-11, device=device)


def test_catches_the_loss_not_divided_across_micro_batches(device, monkeypatch):
    big, micro = Engine(tiny(), device=device), Engine(tiny(), Layout(micro_batches=4), device=device)
    big.forward_backward(0, TASK, 16)
    # the mistake: backward from S * loss_i instead of S * loss_i / M on each micro-batch
    monkeypatch.setattr(Engine, "loss_scale", lambda self: float(self.layout.micro_batches))
    micro.forward_backward(0, TASK, 16)
    with pytest.raises(parity.ParityError, match="each of the M=4 micro-batches not divided by M"):
        parity.check(None, parity.compare_models(micro, big, ("grad",)), 1e-12)


# ----------------------------------------------------------------------------- plumbing

def test_engine_errors(device):
    with pytest.raises(ValueError, match="--batch-size 10 does not split into --dp 1 x --micro-batches 4"):
        Engine(tiny(), Layout(micro_batches=4), device=device).train_step(0, TASK, 10)
    with pytest.raises(ValueError, match="needs a ProcessGrid"):
        Engine(tiny(), Layout(dp=2), device=device)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        Engine(tiny(), optim=OptimConfig(name="lamb"), device=device)


def test_train_step_releases_every_saved_activation(device):
    engine = Engine(tiny(dropout=0.1), device=device)
    engine.train_step(0, TASK, 8)
    assert engine.ledger.current("activation") == 0 < engine.ledger.peak("activation")
    n = engine.model.num_params()
    assert engine.ledger.current("param") == engine.ledger.current("optim_m") == 8 * n   # fp64
