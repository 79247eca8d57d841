"""The memory ledger (bytes by category x placement, peaks) and the analytic
formulas of formulas.py, each checked on hand-computed values."""
import json

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.autograd import Function, Tensor, track_saved
from minipar.formulas import (activation_bytes_formula, bytes_per_param, comm_elements_per_step,
                              model_state_breakdown, model_state_bytes_formula, padded_numel,
                              pp_comm_elements, tp_comm_elements)
from minipar.memory import CATEGORIES, MemoryLedger, measure_alive, traced_bytes


pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on


# ----------------------------------------------------------------------------- ledger

def test_add_remove_current_by_category_and_placement():
    led = MemoryLedger(rank=3)
    w = numpy.zeros((10, 20), dtype=numpy.float16)              # 400 bytes
    assert led.add("w", w, "param") == 400
    led.add("w.grad", 400, "grad")
    led.add("w.m", 800, "optim_m", placement="host")
    assert led.current() == 1600
    assert led.current("param") == 400
    assert led.current(placement="host") == 800
    assert led.current("optim_m", "device") == 0
    assert led.by_category() == {**{c: 0 for c in CATEGORIES}, "param": 400, "grad": 400, "optim_m": 800}
    assert led.by_category("device")["optim_m"] == 0
    assert "w" in led and led.names("grad") == ["w.grad"]
    led.remove("w.grad")
    assert led.current() == 1200 and "w.grad" not in led


def test_re_adding_a_name_resizes_it():
    led = MemoryLedger()
    led.add("bucket", 100, "buffer")
    led.add("bucket", 30, "buffer")
    assert led.current("buffer") == 30 and led.current() == 30
    assert led.peak("buffer") == 100
    led.add("bucket", 30, "padding", placement="host")          # may move category/placement too
    assert led.current("buffer") == 0 and led.current("padding", "host") == 30


def test_peak_of_a_total_is_the_peak_of_the_sum():
    led = MemoryLedger()
    led.add("a", 100, "param")
    led.remove("a")
    led.add("b", 60, "grad")
    led.add("c", 30, "grad", placement="host")
    assert led.peak() == 100                                    # not 100 + 90
    assert led.peak("param") == 100 and led.current("param") == 0
    assert led.peak("grad") == 90 and led.peak("grad", "device") == 60
    assert led.peak(placement="device") == 100 and led.peak(placement="host") == 30
    led.reset_peak()
    assert led.peak() == 90 and led.peak("param") == 0


def test_model_state_bytes_and_report():
    led = MemoryLedger(rank=1)
    for cat, n in zip(("param", "grad", "master", "optim_m", "optim_v", "padding"), (1, 2, 4, 8, 16, 32)):
        led.add(cat, n, cat)
    led.add("act", 64, "activation")
    led.add("staging", 128, "buffer", placement="host")
    assert led.model_state_bytes() == 63
    assert led.model_state_bytes("host") == 0
    rep = json.loads(json.dumps(led.report()))                   # JSON-able
    assert rep["rank"] == 1 and rep["current"] == 255 and rep["peak"] == 255 and rep["model_state"] == 63
    assert rep["by_category"]["buffer"]["host"] == {"current": 128, "peak": 128}
    assert set(rep["by_category"]) == set(CATEGORIES)


def test_bad_input_is_refused():
    led = MemoryLedger()
    with pytest.raises(ValueError, match="category"):
        led.add("x", 1, "weights")
    with pytest.raises(ValueError, match="placement"):
        led.add("x", 1, "param", placement="gpu")
    with pytest.raises(ValueError, match="byte count"):
        led.add("x", -1, "param")
    with pytest.raises(ValueError, match="byte count"):
        led.add("x", 1.5, "param")
    with pytest.raises(KeyError, match="'nope'"):
        led.remove("nope")
    with pytest.raises(ValueError):
        led.released(1)                                          # nothing was saved


def test_saved_released_track_activation_current_and_peak():
    led = MemoryLedger()
    led.add("w", 1000, "param")
    for n in (10, 20, 30):                                       # forward: three layers save
        led.saved(n)
    assert led.current("activation") == 60 and led.current() == 1060
    for n in (30, 20):                                           # backward frees in reverse
        led.released(n)
    led.saved(5)
    assert led.current("activation") == 15
    assert led.peak("activation") == 60 and led.peak("activation", "device") == 60
    assert led.peak() == 1060


class _Square(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        return (2 * x * grad,)


def test_ledger_is_autograds_saved_activation_tracker():
    led = MemoryLedger()
    x = Tensor(numpy.ones(100), requires_grad=True)              # 800 bytes
    with track_saved(led):
        y = _Square.apply(_Square.apply(x))                      # saves x, then x²: 1600 bytes
        assert led.current("activation") == 1600
        y.backward(numpy.ones(100))
    assert led.current("activation") == 0 and led.peak("activation") == 1600


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1000), st.sampled_from(CATEGORIES),
                          st.sampled_from(("device", "host"))), max_size=30))
def test_current_is_the_sum_alive_and_peak_the_running_max(ops):
    """Random add/re-add/remove sequences: the ledger agrees with a plain replay."""
    led, alive, peak = MemoryLedger(), {}, 0
    for key, nbytes, cat, place in ops:
        name = f"a{key}"
        if name in alive and nbytes % 3 == 0:
            led.remove(name)
            del alive[name]
        else:
            led.add(name, nbytes, cat, place)
            alive.pop(name, None)      # a resize frees the old size first
            alive[name] = (nbytes, cat, place)
        peak = max(peak, sum(n for n, _, _ in alive.values()))
    assert led.current() == sum(n for n, _, _ in alive.values())
    assert led.peak() == peak
    for cat in CATEGORIES:
        assert led.current(cat, "host") == sum(n for n, c, p in alive.values() if c == cat and p == "host")


def test_measure_alive_cross_checks_the_ledger():
    """tracemalloc sees NumPy's buffers: what the ledger says is held is alive."""
    led = MemoryLedger()
    with measure_alive() as m:
        params = {f"w{i}": numpy.ones(50_000) for i in range(4)}      # 4 x 400 kB
        for name in params:
            led.add(name, params[name], "param")
        assert led.current() == 1_600_000
        assert abs(m.now() - led.current()) < 0.01 * led.current()   # Python object overhead only
        temp = numpy.ones(300_000)                                     # 2.4 MB, never registered
        assert m.now() - led.current() > 2_300_000                     # the check sees what's missing
        del temp
        for name in list(params):                                      # free and tell the ledger
            del params[name]
            led.remove(name)
        assert abs(m.now() - led.current()) < 10_000
        assert traced_bytes()[0] > 0
    assert abs(m.alive) < 10_000
    assert m.peak >= 1_600_000 + 2_400_000                             # the temporary was seen


# ----------------------------------------------------------------------------- ZeRO formulas

PHI, N = 7_500_000_000, 64


@pytest.mark.parametrize("precision, expected", [
    ("mixed", (16 * PHI, 4 * PHI + 12 * PHI / N, 2 * PHI + 14 * PHI / N, 16 * PHI / N)),
    ("fp32", (16 * PHI, 8 * PHI + 8 * PHI / N, 4 * PHI + 12 * PHI / N, 16 * PHI / N)),
    ("fp64", (32 * PHI, 16 * PHI + 16 * PHI / N, 8 * PHI + 24 * PHI / N, 32 * PHI / N)),
])
def test_model_state_formula_per_stage(precision, expected):
    for stage, value in enumerate(expected):
        assert model_state_bytes_formula(PHI, N, stage, precision) == value


def test_model_state_hand_values_and_breakdown():
    assert model_state_bytes_formula(1000, 4, 1) == 7000                 # 4000 + 12000/4
    assert model_state_bytes_formula(1000, 4, 2) == 5500                 # 2000 + 14000/4
    assert model_state_breakdown(1000, 4, 2) == {"param": 2000, "grad": 500, "master": 1000,
                                                 "optim_m": 1000, "optim_v": 1000}
    assert model_state_breakdown(1000, 4, 0, "fp32") == {"param": 4000, "grad": 4000, "master": 0,
                                                         "optim_m": 4000, "optim_v": 4000}
    assert model_state_breakdown(1000, 4, 3, "fp64")["param"] == 2000
    assert bytes_per_param("mixed") == {"param": 2, "grad": 2, "master": 4, "optim_m": 4, "optim_v": 4}
    for stage in range(4):
        assert sum(model_state_breakdown(PHI, N, stage).values()) == model_state_bytes_formula(PHI, N, stage)
    with pytest.raises(ValueError):
        model_state_bytes_formula(1000, 4, 4)
    with pytest.raises(ValueError):
        model_state_bytes_formula(1000, 4, 1, precision="bf16")


def test_offload_moves_the_optimizer_part_to_host():
    dev, host = model_state_bytes_formula(PHI, N, 2, offload=True)
    assert host == 12 * PHI / N                                          # K·Φ/N, K = 12
    assert dev == 2 * PHI + 2 * PHI / N
    assert dev + host == model_state_bytes_formula(PHI, N, 2)
    assert model_state_bytes_formula(1000, 4, 0, "fp32", offload=True) == (8000, 8000)


def test_padding():
    assert padded_numel(10, 4) == 12 and padded_numel(12, 4) == 12 and padded_numel(0, 3) == 0
    # Φ = 10, N = 4: each shard holds ceil(10/4) = 3 elements, 2 of the 12 are padding
    assert model_state_breakdown(10, 4, 3, padded=True)["param"] == 2 * 3
    assert model_state_bytes_formula(10, 4, 3, padded=True) == 16 * 3
    assert model_state_bytes_formula(10, 4, 1, padded=True) == 4 * 10 + 12 * 3
    assert model_state_bytes_formula(12, 4, 3, padded=True) == model_state_bytes_formula(12, 4, 3)


def test_ledger_filled_like_zero2_matches_the_formula():
    """How a strategy uses both halves: register what rank r holds, compare."""
    phi, n = 10, 4
    shard = padded_numel(phi, n) // n
    led = MemoryLedger(rank=n - 1)                      # last rank: 1 real element + 2 padding
    led.add("params.fp16", numpy.zeros(phi, numpy.float16), "param")
    led.add("grad.shard", numpy.zeros(1, numpy.float16), "grad")
    for cat in ("master", "optim_m", "optim_v"):
        led.add(f"{cat}.shard", numpy.zeros(1, numpy.float32), cat)
    led.add("pad", (shard - 1) * (2 + 4 + 4 + 4), "padding")
    assert led.model_state_bytes() == model_state_bytes_formula(phi, n, 2, padded=True)


# ----------------------------------------------------------------------------- communication

def test_comm_elements_per_step():
    assert comm_elements_per_step(1000, 4, 0) == 1500                    # 2Φ(N-1)/N
    assert comm_elements_per_step(1000, 4, 1) == comm_elements_per_step(1000, 4, 2) == 1500
    assert comm_elements_per_step(1000, 4, 3) == 2250                    # 3Φ(N-1)/N
    assert comm_elements_per_step(1000, 1, 3) == 0
    with pytest.raises(ValueError):
        comm_elements_per_step(1000, 4, 5)


def test_tp_and_pp_comm_elements():
    b, s, h = 2, 16, 32
    assert tp_comm_elements(b, s, h, 4, n_layers=1) == 8 * 1024 * 3 / 4      # 6144
    assert tp_comm_elements(b, s, h, 4, n_layers=3) == 3 * 6144
    assert tp_comm_elements(b, s, h, 4, 3, sequence_parallel=True) == 3 * 10 * 1024 * 3 / 4   # + 2 re-gathers
    assert tp_comm_elements(b, s, h, 1, 3) == 0
    assert pp_comm_elements(b, s, h, micro_batches=4) == 4 * 1024


# ----------------------------------------------------------------------------- activations

def test_activation_bytes_korthikanti_closed_forms():
    s, b, h, a = 2048, 1, 12288, 96                                      # GPT-3 175B layer
    sbh = s * b * h
    plain = activation_bytes_formula(s, b, h, a)
    assert plain == sbh * (34 + 5 * a * s / h)
    for t in (2, 8):
        tp = activation_bytes_formula(s, b, h, a, t=t)
        assert tp == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)), rel=1e-15)
        sp = activation_bytes_formula(s, b, h, a, t=t, sequence_parallel=True)
        assert sp == pytest.approx(sbh / t * (34 + 5 * a * s / h), rel=1e-15)
        assert sp == pytest.approx(plain / t, rel=1e-15)
    # hand-checked: s=4, b=1, h=8, a=2 -> sbh = 32, 5as/h = 5 -> 32 * 39 = 1248 bytes
    assert activation_bytes_formula(4, 1, 8, 2) == 1248
    # t = 2: 32 * (10 + 12 + 2.5) = 784
    assert activation_bytes_formula(4, 1, 8, 2, t=2) == 784
    # fp64 without dropout: 8 bytes x (16 sbh + 2 as²b) = 8 * (512 + 64)
    assert activation_bytes_formula(4, 1, 8, 2, bytes_per=8, mask_bytes=0) == 4608
