"""minipar.strict, the CPU stand-in for CuPy: it refuses every implicit host <-> device move.

The whole MPI parity suite also runs on it (`make test` passes `--device strict`); these tests
pin down the rules themselves and show the stand-in catches a planted host round-trip.
"""
import numpy as np
import pytest

from minipar import backend, ops, strict
from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree
from minipar.engine import Engine, Layout
from minipar.nn import GPTConfig

pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

CFG = GPTConfig(vocab_size=11, seq_len=8, n_layer=1, n_head=2, d_model=8)


def test_explicit_moves_work_and_results_match_numpy():
    host = np.arange(6.0).reshape(2, 3)
    dev = backend.to_device(host, strict)
    assert backend.array_module(dev) is strict
    out = strict.exp(dev.T @ dev) + 1.0                      # a module function, a matmul, a scalar
    np.testing.assert_array_equal(backend.to_host(out), np.exp(host.T @ host) + 1.0)
    assert float(dev.sum()) == 15.0 and dev.shape == (2, 3)


@pytest.mark.parametrize("mistake", [
    lambda d, h: np.asarray(d),                              # device -> host, implicitly
    lambda d, h: np.exp(d),                                  # a numpy function on device data
    lambda d, h: d + h,                                      # device op with a host operand
    lambda d, h: strict.maximum(d, h),                       # device function with a host operand
    lambda d, h: d.__setitem__(slice(None), h),              # host data written into device memory
])
def test_implicit_moves_are_refused(mistake):
    host = np.ones((2, 3))
    with pytest.raises(TypeError):
        mistake(backend.to_device(host, strict), host)


def test_engine_trains_on_the_stand_in_like_on_numpy():
    task = ReverseTask(4)
    cpu, dev = Engine(CFG, device="cpu"), Engine(CFG, device="strict")
    assert backend.array_module(dev.params[0].data) is strict
    for step in range(2):
        assert cpu.train_step(step, task, 4) == dev.train_step(step, task, 4)   # the same numbers
    assert cpu.accuracy(task, 8) == dev.accuracy(task, 8)


def test_catches_a_numpy_call_in_compute_code(monkeypatch):
    """Bug zoo: GELU computed with numpy's tanh instead of the array's module passes on CPU
    and would break on a GPU; the strict device catches it on CPU."""
    def numpy_gelu(ctx, x):
        t = np.tanh(0.79788456 * (x + 0.044715 * x * x * x))
        ctx.save_for_backward(x, t)
        return 0.5 * x * (1.0 + t)
    monkeypatch.setattr(ops.GELU, "forward", staticmethod(numpy_gelu))
    task = ReverseTask(4)
    Engine(CFG, device="cpu").train_step(0, task, 4)          # silently fine on NumPy
    with pytest.raises(TypeError):
        Engine(CFG, device="strict").train_step(0, task, 4)


def test_unknown_and_missing_devices_are_clear():
    with pytest.raises(ValueError, match="unknown device"):
        backend.device_module("tpu")
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="CuPy"):
            backend.device_module("gpu")


def test_host_device_copies_are_counted():
    """Parameters cross once, at construction; each step moves its micro-batches' ids and
    targets (B*T int64 each) and nothing else; predictions come back as B*T int64."""
    task = ReverseTask(4)
    engine = Engine(CFG, Layout(micro_batches=2), device="strict")
    moved = engine.ledger.transfers
    params = sum(p.data.nbytes for p in engine.params)
    assert (moved.to_device, moved.to_host) == (params, 0)
    engine.train_step(0, task, 4)
    batch = 2 * 4 * task.seq_len * 8                      # x and y, 4 samples of T int64
    assert (moved.to_device, moved.to_host) == (params + batch, 0)
    engine.predict(task.batch(0, np.arange(3), "val")[0])
    assert (moved.to_device, moved.to_host) == (params + batch + 3 * task.seq_len * 8, 3 * task.seq_len * 8)
    cpu = Engine(CFG, Layout(micro_batches=2), device="cpu")
    cpu.train_step(0, task, 4)
    assert (cpu.ledger.transfers.to_device, cpu.ledger.transfers.to_host) == (0, 0)   # nothing crosses


@pytest.mark.mpi
@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
@pytest.mark.parametrize("zero,offload", [(0, False), (2, True)], ids=["ddp", "zero2-offload"])
def test_staging_and_offload_copies_per_step(group_of, direct, zero, offload):
    """dp=2 on the strict device. Staging (unless MPI is direct): DDP copies every gradient
    bucket down and back up once; ZeRO-2 its reduce-scatter and all-gather buffers. Engine
    copies: the batch, and under Offload the gradient shard down and the parameter shard up."""
    block = group_of(2)
    block = Group(block.comm, "block", CommLedger(), direct=direct)
    engine = Engine(CFG, Layout(dp=2, zero=zero, offload=offload), seed=1,
                    grid=ProcessGrid(block, 2, 1, 1), device="strict")
    task, staged, moved = ReverseTask(4), block.ledger.transfers, engine.ledger.transfers
    engine.train_step(0, task, 4)
    staged.reset()
    before = (moved.to_device, moved.to_host)
    engine.train_step(1, task, 4)
    batch = 2 * 2 * task.seq_len * 8                      # this rank's 2 samples: x and y
    grads = sum(p.data.nbytes for p in engine.params)
    if offload:
        shard = engine.optimizer.optim
        want_engine = (batch + shard.bytes_to_device, shard.bytes_to_host)
        # reduce-scatter: Φ_pad down, S up; all-gather of the parameters: S down, Φ_pad up
        both_ways = 8 * (engine.optimizer.numel_padded + engine.optimizer.shard_size)
        want_staged = (0, 0) if direct else (both_ways, both_ways)
        ok_shard = shard.bytes_to_host == shard.bytes_to_device > 0
    else:
        want_engine, ok_shard = (batch, 0), True
        want_staged = (0, 0) if direct else (grads, grads)
    got_engine = (moved.to_device - before[0], moved.to_host - before[1])
    agree(block, got_engine == want_engine and (staged.to_device, staged.to_host) == want_staged
          and ok_shard, f"engine copies {got_engine} want {want_engine}; staging "
          f"{(staged.to_device, staged.to_host)} want {want_staged}")
