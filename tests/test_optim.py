"""Optimizers (minipar/optim.py) against their formulas written out here by hand, and the
mixed-precision machinery: fp32 master weights behind fp16 parameters, dynamic loss
scaling (halve and skip on overflow, grow after a run of clean steps), global-norm
clipping. Serial."""
import math

import numpy as np
import pytest

from minipar.backend import to_host
from minipar.data import ReverseTask
from minipar.engine import Engine, OptimConfig
from minipar.layers import Parameter
from minipar.nn import GPTConfig
from minipar.optim import SGD, AdamW, LossScaler, grad_stats, prepare_step

pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

SHAPES = [(3, 4), (5,), (2, 1, 3)]


def make_params(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s).astype(dtype), name=f"p{i}") for i, s in enumerate(SHAPES)]


def grads_for(step, seed=100):
    rng = np.random.default_rng([seed, step])
    return [rng.standard_normal(s) for s in SHAPES]


# ----------------------------------------------------------------------------- update rules

def test_adamw_matches_the_formula_over_several_steps():
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    params = make_params(0)
    opt = AdamW(params, lr, (b1, b2), eps, wd)
    p = [q.data.copy() for q in params]
    m, v = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
    for t in range(1, 6):
        for q, g in zip(params, grads_for(t)):
            q.grad = g
        opt.step()
        for i, g in enumerate(grads_for(t)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)          # bias correction
            p[i] = p[i] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[i])   # decoupled decay
    state = opt.state()
    for i, q in enumerate(params):
        np.testing.assert_allclose(q.data, p[i], rtol=1e-13)
        np.testing.assert_allclose(state[q.name]["m"], m[i], rtol=1e-13)
        np.testing.assert_allclose(state[q.name]["v"], v[i], rtol=1e-13)
        assert state[q.name]["master"] is q.data                       # fp64: no master copy


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_with_momentum_and_weight_decay_matches_the_formula(momentum):
    lr, wd = 0.05, 0.01
    params = make_params(1)
    opt = SGD(params, lr, momentum, wd)
    p = [q.data.copy() for q in params]
    buf = [np.zeros_like(x) for x in p]
    for t in range(1, 5):
        for q, g in zip(params, grads_for(t)):
            q.grad = g
        opt.step()
        for i, g in enumerate(grads_for(t)):
            buf[i] = momentum * buf[i] + g + wd * p[i]
            p[i] = p[i] - lr * buf[i]
    for q, expected in zip(params, p):
        np.testing.assert_allclose(q.data, expected, rtol=1e-13)


def test_step_scales_gradients_and_skips_parameters_without_one():
    a, b = make_params(2)[:2]
    before = b.data.copy()
    a.grad = np.ones_like(a.data) * 8.0
    SGD([a, b], lr=0.5).step(grad_scale=0.25)                         # uses 0.25 * 8 = 2
    np.testing.assert_array_equal(b.data, before)
    np.testing.assert_allclose(a.data, make_params(2)[0].data - 1.0)


# ----------------------------------------------------------------------------- mixed precision

def test_master_weights_are_fp32_and_fp16_params_follow_them():
    params = make_params(3, np.float16)
    opt = AdamW(params, lr=1e-3, master_dtype=np.float32)
    assert all(w.dtype == np.float32 for w in opt.master + opt.m + opt.v)
    for t in range(1, 4):
        for q, g in zip(params, grads_for(t)):
            q.grad = g.astype(np.float16)
        opt.step()
        for q, w in zip(params, opt.master):
            assert q.data.dtype == np.float16
            np.testing.assert_array_equal(q.data, w.astype(np.float16))


def test_master_weights_keep_updates_too_small_for_fp16():
    """Near 1.0 fp16 steps by 2^-10 ~ 1e-3: an update of 1e-4 is lost without a master copy."""
    def run(master_dtype):
        p = Parameter(np.ones(4, np.float16))
        opt = SGD([p], lr=1e-4, master_dtype=master_dtype)
        for _ in range(20):
            p.grad = np.ones(4, np.float16)
            opt.step()
        return p.data
    assert (run(None) == 1.0).all()                                   # every update rounded away
    np.testing.assert_allclose(run(np.float32), 1 - 20e-4, atol=2 ** -11)


def test_loss_scaler_halves_on_overflow_and_grows_after_the_interval():
    scaler = LossScaler(init_scale=64.0, growth_interval=3)
    for _ in range(2):
        scaler.update(found_inf=False)
    assert scaler.scale == 64.0
    scaler.update(found_inf=True)                                     # overflow resets the clean run
    assert scaler.scale == 32.0
    for expected in (32.0, 32.0, 64.0, 64.0, 64.0, 128.0):
        scaler.update(found_inf=False)
        assert scaler.scale == expected


def test_prepare_step_skips_on_inf_and_unscales_otherwise():
    params = make_params(4, np.float16)
    for q in params:
        q.grad = np.full(q.data.shape, 2.0, np.float16)
    scaler = LossScaler(init_scale=4.0, growth_interval=2)
    params[1].grad[2] = np.inf                                        # an overflowed gradient
    assert prepare_step(params, scaler=scaler) == (None, math.inf) and scaler.scale == 2.0
    params[1].grad[2] = 2.0
    n = sum(q.data.size for q in params)
    grad_scale, norm = prepare_step(params, scaler=scaler)
    assert grad_scale == 1 / 2.0 and norm == pytest.approx(math.sqrt(4 * n) / 2.0, rel=1e-15)
    prepare_step(params, scaler=scaler)
    assert scaler.scale == 4.0                                        # two clean steps: grown


def test_engine_skips_the_step_and_halves_the_scale_on_an_injected_inf(device):
    cfg = GPTConfig(vocab_size=11, seq_len=6, n_layer=1, n_head=2, d_model=8, precision="mixed")
    task, engine = ReverseTask(3), Engine(cfg, optim=OptimConfig(init_loss_scale=1024.0), device=device)
    victim, overflow = engine.model.blocks[0].mlp.fc.weight, [True]

    def inject_inf(t):                                                # as if fp16 had overflowed here
        if overflow[0]:
            t.grad[0, 0] = np.inf
    victim.register_post_accumulate_grad_hook(inject_inf)
    before = [p.data.copy() for p in engine.params]
    engine.train_step(0, task, 4)
    assert engine.loss_scale() == 512.0 and engine.optimizer.t == 0
    for p, b in zip(engine.params, before):
        np.testing.assert_array_equal(to_host(p.data), to_host(b))     # the step was skipped
    overflow[0] = False
    engine.train_step(1, task, 4)
    assert engine.loss_scale() == 512.0 and engine.optimizer.t == 1
    assert not np.array_equal(victim.data, before[engine.params.index(victim)])


# ----------------------------------------------------------------------------- clipping

def test_prepare_step_clips_the_global_norm():
    params = make_params(5)
    for q, g in zip(params, grads_for(0)):
        q.grad = g
    norm = math.sqrt(sum((g ** 2).sum() for g in grads_for(0)))
    assert prepare_step(params) == (1.0, pytest.approx(norm, rel=1e-15))
    assert prepare_step(params, max_norm=10 * norm)[0] == 1.0          # under the limit: untouched
    grad_scale, got = prepare_step(params, max_norm=0.5)
    assert got == pytest.approx(norm, rel=1e-15)
    assert grad_scale == pytest.approx(0.5 / (norm + 1e-6), rel=1e-15)   # clip factor max / (||g|| + 1e-6)
    doubled, _ = prepare_step(params, max_norm=0.5, reduce_sum=lambda s: 2 * s)   # 2 ranks, same grads
    assert doubled == pytest.approx(0.5 / (math.sqrt(2) * norm + 1e-6), rel=1e-15)


def test_grad_stats_count_each_serial_parameter_once():
    params = make_params(6)
    for q, g in zip(params, grads_for(0)):
        q.grad = g
    params[0].spec.norm_owner = False                                      # a replica another rank owns
    expected = sum((g ** 2).sum() for g in grads_for(0)[1:])
    np.testing.assert_allclose(grad_stats(params), [expected, 0.0], rtol=1e-15)


def test_engine_train_step_applies_the_clip_factor(device):
    cfg = GPTConfig(vocab_size=11, seq_len=6, n_layer=1, n_head=2, d_model=8)
    task, lr, max_norm = ReverseTask(3), 0.1, 1e-3
    probe = Engine(cfg, device=device)
    probe.forward_backward(0, task, 4)
    grads = [to_host(p.grad).copy() for p in probe.params]
    norm = math.sqrt(sum((g ** 2).sum() for g in grads))
    engine = Engine(cfg, optim=OptimConfig(name="sgd", lr=lr, max_norm=max_norm), device=device)
    before = [to_host(p.data).copy() for p in engine.params]
    engine.train_step(0, task, 4)
    assert engine.grad_norm == pytest.approx(norm, rel=1e-14)
    for p, b, g in zip(engine.params, before, grads):
        np.testing.assert_allclose(to_host(p.data), b - lr * max_norm / (norm + 1e-6) * g, rtol=1e-12, atol=1e-15)
