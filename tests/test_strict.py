"""minipar.strict, the CPU stand-in for CuPy: it refuses every implicit host <-> device move.

The whole MPI parity suite also runs on it (`make test` passes `--device strict`); these tests
pin down the rules themselves and show the stand-in catches a planted host round-trip.
"""
import numpy as np
import pytest

from minipar import backend, ops, strict
from minipar.data import ReverseTask
from minipar.engine import Engine
from minipar.nn import GPTConfig

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


def test_a_planted_numpy_call_in_compute_code_is_caught(monkeypatch):
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
