"""Modules and the GPT (minipar/layers.py, minipar/nn.py): a whole-model gradient check, parameter naming
and ShardSpecs, state_dict save/load, config validation, forward hooks, dropout keys.
Serial, float64 unless a test says otherwise."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipar import ops
from minipar.autograd import Tensor
from minipar.dropout import Dropout, DropoutKey, Rows
from minipar.layers import Linear, ShardSpec
from minipar.nn import GPT, GPTConfig
from strategies import check_gradients, gpt_configs, seeds, shapes, token_batch


pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

def randomize(model, seed, std=0.5):
    """Move every parameter to a generic point (init has zero biases and unit LayerNorm
    weights, where some wrong gradients would vanish)."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.data[...] = rng.standard_normal(p.data.shape) * std


# ----------------------------------------------------------------------------- the whole GPT, differentiated

def gpt_gradient_check(cfg, seed):
    model = GPT(cfg, seed)
    randomize(model, seed)
    batch = 2
    idx, targets = token_batch(cfg, batch, seed)
    key = DropoutKey(seed, step=3, samples=np.arange(batch))           # the same masks on every call
    check_gradients(lambda: model.loss(idx, targets, key), model.parameters(), seed)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gpt_gradients_match_finite_differences(tied, dropout):
    cfg = GPTConfig(vocab_size=7, seq_len=5, n_layer=2, n_head=2, d_model=6, tied_embeddings=tied,
                    dropout=dropout)
    gpt_gradient_check(cfg, seed=11)


@settings(max_examples=20, deadline=None)
@given(cfg=gpt_configs(head_dim=st.integers(3, 4), dropout=st.sampled_from([0.0, 0.3])), seed=seeds)
def test_gpt_gradients_on_drawn_configs(cfg, seed):
    # C >= 3: a LayerNorm over 2 features outputs +-1 whatever its input, so its
    # gradient (nearly) vanishes and the check would have nothing to compare
    gpt_gradient_check(cfg, seed)


def test_catches_a_tied_head_that_drops_its_embedding_gradient(monkeypatch):
    """A classic: the tied output head reads wte as a constant, so wte.grad lacks the
    head's contribution. Forward values are unchanged; only the gradient check sees it."""
    def head_with_detached_wte(self, x):
        return ops.linear(self.ln_f(x), Tensor(self.wte.weight.data), transpose=True)   # (B, T, V)
    cfg = GPTConfig(vocab_size=7, seq_len=5, n_layer=1, n_head=2, d_model=6)
    gpt_gradient_check(cfg, seed=12)
    monkeypatch.setattr(GPT, "head", head_with_detached_wte)
    with pytest.raises(AssertionError, match="wte.weight"):
        gpt_gradient_check(cfg, seed=12)


def test_shorter_sequences_and_too_long_ones():
    model = GPT(GPTConfig(seq_len=4, d_model=8, n_head=2))
    assert model(np.zeros((3, 2), np.int64)).shape == (3, 2, 16)        # (B, T<=seq_len, V)
    with pytest.raises(ValueError, match="exceeds seq_len=4"):
        model(np.zeros((1, 5), np.int64))


@pytest.mark.parametrize("name, param_dtype, logits_dtype", [
    ("fp64", np.float64, np.float64), ("fp32", np.float32, np.float32), ("mixed", np.float16, np.float32)])
def test_precision_policy_dtypes(name, param_dtype, logits_dtype):
    model = GPT(GPTConfig(d_model=8, n_head=2, precision=name))
    assert {p.data.dtype for p in model.parameters()} == {np.dtype(param_dtype)}
    assert model(np.zeros((1, 4), np.int64)).dtype == logits_dtype


# ----------------------------------------------------------------------------- dropout

def test_dropout_key_rows_depend_only_on_the_global_sample_index():
    full = DropoutKey(seed=5, step=2, samples=np.arange(6)).keep(site=4, row=(3, 7), p=0.5)   # (6, 3, 7)
    part = DropoutKey(seed=5, step=2, samples=np.array([4, 1])).keep(site=4, row=(3, 7), p=0.5)
    np.testing.assert_array_equal(part, full[[4, 1]])
    other_site = DropoutKey(seed=5, step=2, samples=np.arange(6)).keep(site=5, row=(3, 7), p=0.5)
    other_step = DropoutKey(seed=5, step=3, samples=np.arange(6)).keep(site=4, row=(3, 7), p=0.5)
    assert (full != other_site).any() and (full != other_step).any()
    big = DropoutKey(seed=0, step=0, samples=np.arange(4)).keep(0, (50, 50), p=0.3)
    assert abs(big.mean() - 0.7) < 0.02


def test_a_dropout_on_rows_of_the_stream_applies_those_rows_of_the_serial_mask():
    """Rows: a sequence-parallel chunk, context-parallel positions, both; and a short T is a
    prefix of the serial row (the first t rows of a draw of seq_len rows are a draw of t)."""
    key, x = DropoutKey(3, 1, np.arange(2)), np.ones((2, 8, 3))                  # (B, T, C)
    serial = Dropout(0.5, 7, 8)(Tensor(x), key).data                              # (2, 8, 3)
    mask = DropoutKey(3, 1, np.arange(2)).keep(7, (8, 3), 0.5)
    np.testing.assert_array_equal(serial, x * mask / 0.5)
    short = Dropout(0.5, 7, 8)(Tensor(x[:, :5]), key).data                        # (2, 5, 3)
    np.testing.assert_array_equal(short, x[:, :5] * DropoutKey(3, 1, np.arange(2)).keep(7, (5, 3), 0.5) / 0.5)
    zigzag = np.array([0, 1, 6, 7])                                               # cp = 2, rank 0
    for rows, mine in [(Rows(chunk=1, chunks=2), slice(4, 8)), (Rows(positions=zigzag), zigzag),
                       (Rows(positions=zigzag, chunk=1, chunks=2), zigzag[2:])]:
        drop = Dropout(0.5, 7, 8)
        drop.rows = rows
        np.testing.assert_array_equal(drop(Tensor(x[:, mine]), key).data, serial[:, mine])


def test_dropout_is_off_in_eval_and_deterministic_per_key_in_training():
    cfg = dict(vocab_size=9, seq_len=6, n_layer=2, n_head=2, d_model=8)
    idx = np.random.default_rng(0).integers(0, 9, (2, 6))
    key = DropoutKey(1, 0, np.arange(2))
    plain, dropped = GPT(GPTConfig(**cfg)), GPT(GPTConfig(**cfg, dropout=0.3))
    np.testing.assert_array_equal(dropped.eval()(idx).data, plain(idx).data)   # eval: no dropout
    dropped.train()
    np.testing.assert_array_equal(dropped(idx, key).data, dropped(idx, key).data)
    assert not np.array_equal(dropped(idx, key).data, plain(idx).data)
    assert not np.array_equal(dropped(idx, DropoutKey(1, 1, np.arange(2))).data, dropped(idx, key).data)


# ----------------------------------------------------------------------------- names, specs, init

def expected_names(n_layer, tied):
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.fc.weight", "mlp.fc.bias",
             "mlp.proj.weight", "mlp.proj.bias"]
    names = ["wte.weight", "wpe.weight"] + [f"blocks.{i}.{n}" for i in range(n_layer) for n in block]
    return names + ["ln_f.weight", "ln_f.bias"] + ([] if tied else ["lm_head.weight"])


@pytest.mark.parametrize("tied", [True, False])
def test_named_parameters_order_is_stable_and_documented(tied):
    cfg = GPTConfig(n_layer=2, d_model=8, n_head=2, tied_embeddings=tied)
    names = [n for n, _ in GPT(cfg, seed=0).named_parameters()]
    assert names == expected_names(2, tied) == [n for n, _ in GPT(cfg, seed=1).named_parameters()]
    for name, p in GPT(cfg).named_parameters():
        assert p.name == name and p.spec == ShardSpec(name, p.data.shape)
    model = GPT(cfg)
    assert model.num_params() == sum(p.data.size for p in model.parameters())
    assert model.blocks[0].attn.c_attn.weight.shape == (8, 24)         # (C, H*3*D): y = x W


def test_init_depends_only_on_the_seed():
    cfg = GPTConfig(d_model=8, n_head=2)
    a, b, c = GPT(cfg, seed=3), GPT(cfg, seed=3), GPT(cfg, seed=4)
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
    assert not np.array_equal(a.wte.weight.data, c.wte.weight.data)


@settings(max_examples=30, deadline=None)
@given(shape=shapes(1, 3, max_side=6), data=st.data())
def test_shard_spec_take_is_a_view_and_shards_tile_the_full_array(shape, data):
    full = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    assert ShardSpec("w", shape).take(full) is full                    # axis None: the whole array
    axis = data.draw(st.integers(0, len(shape) - 1))
    cuts = sorted(data.draw(st.lists(st.integers(0, shape[axis]), max_size=3)))
    bounds = list(zip([0, *cuts], [*cuts, shape[axis]]))
    pieces = [ShardSpec("w", shape, axis, lo, hi).take(full) for lo, hi in bounds]
    for (lo, hi), piece in zip(bounds, pieces):
        np.testing.assert_array_equal(piece, np.take(full, np.arange(lo, hi), axis=axis))
        assert piece.size == 0 or np.shares_memory(piece, full)
    np.testing.assert_array_equal(np.concatenate(pieces, axis=axis), full)


# ----------------------------------------------------------------------------- state_dict

def test_state_dict_round_trip_through_npz(tmp_path):
    cfg = GPTConfig(vocab_size=9, n_layer=1, d_model=8, n_head=2, tied_embeddings=False)
    source, target = GPT(cfg, seed=0), GPT(cfg, seed=1)
    randomize(source, 2)
    source.save(tmp_path / "model.npz")
    with np.load(tmp_path / "model.npz", allow_pickle=False) as f:     # plain arrays, no pickles
        assert sorted(f.files) == sorted(expected_names(1, tied=False))
    target.load(tmp_path / "model.npz")
    for (name, p), (_, q) in zip(source.named_parameters(), target.named_parameters()):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    idx = np.arange(8).reshape(2, 4)
    np.testing.assert_array_equal(source(idx).data, target(idx).data)


def test_mismatched_state_dict_raises_a_clear_value_error():
    model = GPT(GPTConfig(n_layer=1, d_model=8, n_head=2))
    state = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing \['ln_f.bias'\]"):
        model.load_state_dict({k: v for k, v in state.items() if k != "ln_f.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight'\]"):
        model.load_state_dict({**state, "lm_head.weight": np.zeros((8, 16))})
    with pytest.raises(ValueError, match=r"wte.weight has shape \(15, 8\), model expects \(16, 8\)"):
        model.load_state_dict({**state, "wte.weight": np.zeros((15, 8))})


# ----------------------------------------------------------------------------- config validation

@pytest.mark.parametrize("bad, message", [
    (dict(vocab_size=0), "vocab_size must be >= 1"),
    (dict(n_layer=0), "n_layer must be >= 1"),
    (dict(n_head=0), "n_head must be >= 1"),
    (dict(d_model=10, n_head=4), "d_model=10 is not divisible by n_head=4"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(precision="bf16"), "unknown precision 'bf16'"),
])
def test_gpt_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**bad)


# ----------------------------------------------------------------------------- forward hooks

def test_forward_pre_hook_can_replace_the_arguments():
    rng = np.random.default_rng(0)
    layer = Linear(3, 2, rng, np.float64)
    x = rng.standard_normal((4, 3))
    expected = layer(x * 2.0).data
    layer.register_forward_pre_hook(lambda module, args: None)         # None: arguments unchanged
    layer.register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
    np.testing.assert_array_equal(layer(x).data, expected)


def test_forward_hook_can_replace_the_output_and_sees_the_arguments():
    rng = np.random.default_rng(1)
    layer = Linear(3, 2, rng, np.float64)
    x = rng.standard_normal((4, 3))
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append((module, args[0])))   # None: unchanged
    layer.register_forward_hook(lambda module, args, out: out * 3.0)
    np.testing.assert_allclose(layer(x).data, 3.0 * (x @ layer.weight.data + layer.bias.data))
    assert seen[0][0] is layer and seen[0][1] is x


def test_hooks_can_gather_and_free_a_weight_around_forward_and_backward():
    """The ZeRO-3 pattern: pre-hook gathers the weight, post-hook frees it, backward
    re-gathers. Linear reads the weight from the leaf in backward, so dX is right."""
    rng = np.random.default_rng(2)
    layer = Linear(3, 2, rng, np.float64, bias=False)
    full = layer.weight.data.copy()
    gather = lambda module, *_: setattr(module.weight, "data", full.copy())
    layer.register_forward_pre_hook(gather)
    layer.register_forward_hook(lambda module, args, out: setattr(module.weight, "data", np.empty(0)))
    x = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
    y = layer(x)
    assert layer.weight.data.size == 0                                 # freed after forward
    gather(layer)                                                      # re-gathered for backward
    g = rng.standard_normal((4, 2))
    y.backward(g)
    np.testing.assert_allclose(x.grad, g @ full.T, rtol=1e-14)
    np.testing.assert_allclose(layer.weight.grad, x.data.T @ g, rtol=1e-14)


def test_train_and_eval_reach_every_submodule():
    model = GPT(GPTConfig(n_layer=2, d_model=8, n_head=2))
    assert all(not m.training for _, m in model.eval().named_modules())
    assert all(m.training for _, m in model.train().named_modules())
