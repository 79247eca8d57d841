# .venv/bin/python -m pytest -p no:cacheprovider -q tests/test_moe.py
"""The serial mixture of experts (minipar/moe.py): gradients, routing, gates, aux loss, capacity.

Everything here runs on one process: it is the oracle the expert-parallel tests
(test_expert_parallel.py) compare against, so it is checked against finite differences
and against the formulas written in moe.py's docstring.
"""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipar import plan, sizing
from minipar.args import UsageError, build_parser
from minipar.autograd import Tensor
from minipar.moe import MoE, aux_of, moe_counts, top_k
from minipar.nn import GPT, GPTConfig
from minipar.train import configure, main
from strategies import check_gradients, seeds, token_batch

pytestmark = pytest.mark.ep


def layer(experts=4, k=2, cf=None, coef=0.3, c=8, seed=0, scale=0.5):
    """One MoE layer with O(1) weights (0.02-scale ones would make every gate nearly equal)."""
    cfg = GPTConfig(vocab_size=8, seq_len=4, n_layer=1, n_head=2, d_model=c, experts=experts, top_k=k,
                    aux_loss_coef=coef, capacity_factor=cf)
    moe = MoE.from_config(cfg, np.random.default_rng(seed), np.float64)
    rng = np.random.default_rng(seed + 1)
    for p in moe.parameters():
        p.data[...] = rng.standard_normal(p.data.shape) * scale
    return moe


@settings(max_examples=6)
@given(seed=seeds, experts=st.integers(2, 5), k=st.integers(1, 3), cf=st.sampled_from([None, 0.5, 1.0]))
def test_gradients_through_router_gates_and_experts(seed, experts, k, cf):
    """Finite differences of <moe(x), w> + aux agree with backward for x and every parameter:
    the router (through softmax, the top-k gather and the renormalisation) and the experts."""
    k = min(k, experts)
    moe = layer(experts, k, cf, seed=seed % 1000)
    x = Tensor(np.random.default_rng(seed).standard_normal((2, 3, 8)), requires_grad=True)
    w = np.random.default_rng(seed + 7).standard_normal((2, 3, 8))

    def fn():
        return (moe(x) * w).sum() + moe.aux
    check_gradients(fn, [x] + moe.parameters(), seed, rtol=1e-5, atol=1e-7)


def test_top_k_ties_go_to_the_lower_expert_index():
    probs = np.array([[0.25, 0.25, 0.25, 0.25],
                      [0.1, 0.4, 0.1, 0.4],
                      [0.3, 0.2, 0.3, 0.2]])
    assert top_k(probs, 2).tolist() == [[0, 1], [1, 3], [0, 2]]
    assert top_k(probs, 3).tolist() == [[0, 1, 2], [1, 3, 0], [0, 2, 1]]


def test_a_zero_router_ties_everywhere_and_leaves_experts_empty():
    """All probabilities equal: every token picks experts 0..k-1 with gates 1/k; the others get nothing."""
    moe = layer(experts=4, k=2)
    moe.router.weight.data[...] = 0.0
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    out = moe(Tensor(x))
    assert moe.stats["tokens"].tolist() == [6, 6, 0, 0]
    want = sum(0.5 * ffn_of(moe, e, x.reshape(6, 8)) for e in (0, 1))
    np.testing.assert_allclose(out.data.reshape(6, 8), want, rtol=1e-12, atol=1e-14)


def ffn_of(moe, e, rows):
    """Expert e's MLP on rows, written out with NumPy: the reference for the layer's output."""
    h = rows @ moe.w_fc.data[e] + moe.b_fc.data[e]
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return h @ moe.w_proj.data[e] + moe.b_proj.data[e]


@settings(max_examples=5)
@given(seed=seeds, k=st.integers(1, 4))
def test_output_is_the_renormalised_gate_sum_of_expert_outputs(seed, k):
    """y_t = sum_{e in topk(t)} p_te / (sum_{e' in topk(t)} p_te') FFN_e(x_t), token by token."""
    moe = layer(experts=4, k=k, seed=seed % 1000)
    x = np.random.default_rng(seed).standard_normal((1, 5, 8))
    out = moe(Tensor(x)).data.reshape(5, 8)
    rows = x.reshape(5, 8)
    logits = rows @ moe.router.weight.data
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for t in range(5):
        chosen = top_k(p[t:t + 1], k)[0]
        gates = p[t, chosen] / p[t, chosen].sum()
        want = sum(g * ffn_of(moe, e, rows[t:t + 1])[0] for g, e in zip(gates, chosen))
        np.testing.assert_allclose(out[t], want, rtol=1e-10, atol=1e-12)


def test_aux_loss_is_switch_formula():
    """L_aux = alpha E sum_i f_i P_i with f_i = c_i / (N k) and P_i the mean probability."""
    moe = layer(experts=4, k=2, coef=0.25)
    x = np.random.default_rng(3).standard_normal((2, 4, 8))
    moe(Tensor(x))
    rows = x.reshape(8, 8)
    logits = rows @ moe.router.weight.data
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    counts = np.bincount(top_k(p, 2).reshape(-1), minlength=4)
    want = 0.25 * 4 * np.sum(counts / (8 * 2) * p.mean(0))
    assert moe.stats["tokens"].tolist() == counts.tolist()
    assert abs(moe.aux.data[0] - want) < 1e-14
    assert sum(moe.stats["tokens"]) == 8 * 2            # dropless: every token reaches its k experts


@settings(max_examples=5)
@given(seed=seeds, cf=st.sampled_from([0.25, 0.5, 1.0, 2.0]))
def test_capacity_keeps_the_first_slots_of_each_expert(seed, cf):
    """Capacity C = ceil(cf N k / E): an expert keeps its first C slots in (token, choice) order,
    drops the rest, and a dropped slot adds nothing to its token's output."""
    moe, dropless = layer(experts=4, k=2, cf=cf, seed=seed % 1000), layer(experts=4, k=2, seed=seed % 1000)
    x = np.random.default_rng(seed).standard_normal((2, 5, 8))
    out, full = moe(Tensor(x)).data.reshape(10, 8), dropless(Tensor(x)).data.reshape(10, 8)
    cap = math.ceil(cf * 10 * 2 / 4)
    logits = x.reshape(10, 8) @ moe.router.weight.data
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    choice = top_k(p, 2)
    seen, kept = np.zeros(4, int), np.zeros((10, 2), bool)
    for t in range(10):
        for s in range(2):
            kept[t, s] = seen[choice[t, s]] < cap
            seen[choice[t, s]] += 1
    assert moe.stats["dropped"] == int((~kept).sum())
    assert moe.stats["tokens"].tolist() == np.bincount(choice.reshape(-1), minlength=4).tolist()
    rows = x.reshape(10, 8)
    for t in range(10):
        gates = p[t, choice[t]] / p[t, choice[t]].sum()
        want = sum(g * ffn_of(moe, e, rows[t:t + 1])[0] for g, e, keep in zip(gates, choice[t], kept[t]) if keep)
        np.testing.assert_allclose(out[t], want if np.ndim(want) else np.zeros(8), rtol=1e-10, atol=1e-12)
    if kept.all():
        np.testing.assert_allclose(out, full, rtol=1e-12)


def test_gpt_loss_carries_the_aux_gradient_not_its_value():
    """GPT.loss is the cross-entropy; its backward is that of cross-entropy + sum of the aux terms."""
    cfg = GPTConfig(vocab_size=8, seq_len=4, n_layer=2, n_head=2, d_model=8, experts=4, top_k=2,
                    aux_loss_coef=0.5, moe_every=2)
    model = GPT(cfg, seed=1)
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoE"]
    idx, y = token_batch(cfg, 3, seed=2)
    loss = model.loss(idx, y)
    ce = model.criterion(model(idx), y)
    assert loss.item() == ce.item()
    loss.backward()
    got = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    total = model.criterion(model(idx), y) + aux_of(model.blocks)
    total.backward()
    for n, p in model.named_parameters():
        np.testing.assert_allclose(got[n], p.grad, rtol=1e-12, atol=1e-15, err_msg=n)
    params = [p for n, p in model.named_parameters() if "router" in n or "mlp.w_" in n][:3]

    def fn():
        return model.criterion(model(idx), y) + aux_of(model.blocks)
    check_gradients(fn, params, seed=5, rtol=1e-5, atol=1e-9)


def test_counts_and_config_rules():
    cfg = GPTConfig(d_model=16, n_layer=2, experts=8, top_k=2)
    total, active = moe_counts(cfg)
    assert total == 8 * (2 * 16 * 64 + 64 + 16) + 16 * 8 and active == 2 * (2 * 16 * 64 + 64 + 16) + 16 * 8
    dense = GPT(GPTConfig(d_model=16, n_layer=2)).num_params()
    moe = GPT(cfg).num_params()
    assert moe - dense == 2 * (total - (2 * 16 * 64 + 64 + 16))
    for bad in (dict(top_k=9), dict(top_k=0), dict(moe_every=0), dict(aux_loss_coef=-1.0),
                dict(capacity_factor=0.0)):
        with pytest.raises(ValueError):
            GPTConfig(experts=8, **bad)


def test_plan_counts_total_and_active_parameters(capsys):
    """plan's MoE counts: Mixtral-like 32 x 4096 with E = 8, k = 2 -> 3.67e10 total, 1.10e10 active."""
    phi = sizing.gpt_param_count(32, 4096, 50304, 2048)
    total, active = sizing.moe_param_counts(phi, 32, 4096, 8, 2)
    assert total - phi == 32 * (7 * 8 * 4096 ** 2 + 4096 * 8)
    assert active - phi == 32 * (1 * 8 * 4096 ** 2 + 4096 * 8)
    assert sizing.moe_param_counts(phi, 32, 4096, 8, 2, moe_every=2)[0] - phi == (total - phi) // 2
    assert plan.main(["--gpus", "64", "--layers", "32", "--hidden", "4096", "--heads", "32", "--seq", "2048",
                      "--batch", "1", "--vocab", "50304", "--experts", "8", "--ep", "8"]) == 0
    assert "active per token" in capsys.readouterr().out


def test_train_flags_validate_experts():
    for world, flags, words in ((4, ["--experts", "6", "--ep", "4", "--dp", "4"], "--ep 4 does not divide --experts 6"),
                                (4, ["--experts", "8", "--ep", "3", "--dp", "4"], "--ep 3 does not divide --dp 4"),
                                (2, ["--ep", "2", "--dp", "2"], "--ep 2 needs a mixture"),
                                (1, ["--experts", "8", "--top-k", "9"], "--top-k 9 is more than --experts 8"),
                                (2, ["--experts", "8", "--tp", "2", "--sequence-parallel"], "--sequence-parallel"),
                                (4, ["--experts", "8", "--cp", "2", "--dp", "2"], "--experts with --cp 2"),
                                (2, ["--experts", "8", "--zero", "3", "--dp", "2"], "--zero 3 with --experts 8")):
        with pytest.raises(UsageError, match=words):
            configure(build_parser().parse_args(flags), world)


def test_train_reports_expert_statistics(tmp_path):
    """A serial MoE run's JSON report carries the routing statistics of every step."""
    path = tmp_path / "report.json"
    assert main(["--experts", "4", "--top-k", "2", "--moe-every", "2", "--n-layer", "2", "--d-model", "16",
                 "--steps", "2", "--batch-size", "4", "--n-digits", "3", "--eval-samples", "8",
                 "--capacity-factor", "0.5", "--report", str(path)]) == 0
    e = json.loads(path.read_text())["experts"]
    assert list(e["layers"]) == ["1"] and e["experts"] == 4 and e["capacity_factor"] == 0.5
    layer = e["layers"]["1"]
    tokens = 4 * 6                                  # batch x seq_len (3 digits -> T = 6)
    assert [sum(t) for t in layer["tokens_per_expert"]] == [tokens * 2] * 2
    assert all(d > 0 for d in layer["dropped"]) and len(layer["aux_loss"]) == 2
    assert e["traffic_matches_formula"]
