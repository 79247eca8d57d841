"""Every op in minipar/ops.py (and the transformer ops it re-exports from transformer_ops.py):
its forward against plain NumPy, and its backward against central finite differences
(strategies.check_gradients) on hypothesis-drawn shapes, broadcasting included. Serial,
float64. The last section shows the oracle can fail."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipar import ops, tensor
from minipar.autograd import Tensor
from strategies import (broadcast_pairs, check_gradients, matmul_shapes, reduce_axes, seeds,
                        shapes)

pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

EXAMPLES = settings(max_examples=30, deadline=None)


def leaves(rng, *shapes_):
    """One float64 leaf Tensor of standard normal values per shape."""
    return [Tensor(rng.standard_normal(s), requires_grad=True, name=f"input {i}")
            for i, s in enumerate(shapes_)]


def away_from_zero(rng, shape):
    """Values with |x| >= 0.5, safe to divide by."""
    return np.asarray(np.sign(rng.standard_normal(shape)) * (0.5 + np.abs(rng.standard_normal(shape))))


# ----------------------------------------------------------------------------- elementwise, broadcast

@EXAMPLES
@given(pair=broadcast_pairs(), op=st.sampled_from(["add", "sub", "mul", "div"]), seed=seeds)
def test_arithmetic_broadcast(pair, op, seed):
    rng = np.random.default_rng(seed)
    a, b = leaves(rng, *pair)
    if op == "div":
        b.data = away_from_zero(rng, pair[1])
    fn = getattr(ops, op)
    expected = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op](a.data, b.data)
    np.testing.assert_array_equal(fn(a, b).data, expected)
    check_gradients(lambda: fn(a, b), [a, b], seed)


@EXAMPLES
@given(shape=shapes(), seed=seeds)
def test_operator_sugar_with_python_scalars(shape, seed):
    x = Tensor(away_from_zero(np.random.default_rng(seed), shape), requires_grad=True)
    fn = lambda: (2.0 * x - 1.5) / 3.0 + (1.0 - x) * x + (-x)       # __rmul__ __truediv__ __rsub__ __neg__
    np.testing.assert_allclose(fn().data, (2 * x.data - 1.5) / 3 + (1 - x.data) * x.data - x.data)
    check_gradients(fn, [x], seed)


# ----------------------------------------------------------------------------- matmul

@EXAMPLES
@given(shapes_=matmul_shapes(), seed=seeds)
def test_matmul_batched_broadcast(shapes_, seed):
    a, b = leaves(np.random.default_rng(seed), *shapes_)
    np.testing.assert_array_equal(ops.matmul(a, b).data, a.data @ b.data)
    check_gradients(lambda: a @ b, [a, b], seed)


# ----------------------------------------------------------------------------- reductions and shapes

@st.composite
def reductions(draw):
    shape = draw(shapes(0, 4))
    return shape, draw(reduce_axes(len(shape))), draw(st.booleans())


@EXAMPLES
@given(case=reductions(), op=st.sampled_from(["sum", "mean"]), seed=seeds)
def test_sum_mean_axes_keepdims(case, op, seed):
    shape, axis, keepdims = case
    (x,) = leaves(np.random.default_rng(seed), shape)
    fn = lambda: getattr(ops, op)(x, axis, keepdims)
    np.testing.assert_allclose(fn().data, getattr(np, op)(x.data, axis=axis, keepdims=keepdims), rtol=1e-14)
    check_gradients(fn, [x], seed)


@EXAMPLES
@given(shape=shapes(), seed=seeds)
def test_reshape(shape, seed):
    (x,) = leaves(np.random.default_rng(seed), shape)
    new = (math.prod(shape[1:]), shape[0])                             # (rest, first): same size
    assert x.reshape(new).shape == new and x.reshape(-1).shape == (x.data.size,)
    check_gradients(lambda: x.reshape(new) * x.reshape(-1).reshape(*new), [x], seed)


@EXAMPLES
@given(shape=shapes(), data=st.data(), seed=seeds)
def test_transpose(shape, data, seed):
    axes = data.draw(st.one_of(st.none(), st.permutations(range(len(shape))).map(tuple)))
    (x,) = leaves(np.random.default_rng(seed), shape)
    fn = lambda: ops.transpose(x, axes)
    np.testing.assert_array_equal(fn().data, x.data.transpose(axes))
    check_gradients(fn, [x], seed)


@st.composite
def basic_indices(draw, shape):
    """A basic (view) index: per axis an int or a slice with a step of +-1 or +-2."""
    index = []
    for n in shape:
        if draw(st.booleans()):
            index.append(draw(st.integers(-n, n - 1)))
        else:
            start, stop = draw(st.integers(-n, n)), draw(st.integers(-n, n))
            index.append(slice(start, stop, draw(st.sampled_from([1, 2, -1, -2]))))
    return tuple(index)


@EXAMPLES
@given(shape=shapes(), data=st.data(), seed=seeds)
def test_getitem(shape, data, seed):
    index = data.draw(basic_indices(shape))
    (x,) = leaves(np.random.default_rng(seed), shape)
    fn = lambda: ops.getitem(x, index)
    np.testing.assert_array_equal(fn().data, x.data[index])
    check_gradients(fn, [x], seed)


@EXAMPLES
@given(shape=shapes(), data=st.data(), seed=seeds)
def test_split_then_concat(shape, data, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
    sizes = np.diff([0, *cuts, n]).tolist()                            # pieces may be empty
    (x,) = leaves(np.random.default_rng(seed), shape)
    pieces = ops.split(x, sizes, axis)
    for piece, expected in zip(pieces, np.split(x.data, np.cumsum(sizes)[:-1], axis)):
        np.testing.assert_array_equal(piece.data, expected)
    # split, scale each piece differently, put back together: a non-trivial Jacobian
    fn = lambda: ops.concat(*[p * float(i + 1) for i, p in enumerate(ops.split(x, sizes, axis))], axis=axis)
    assert fn().shape == shape
    check_gradients(fn, [x], seed)


@EXAMPLES
@given(shape=shapes(1, 3), n=st.integers(1, 3), seed=seeds)
def test_concat_several_tensors(shape, n, seed):
    rng = np.random.default_rng(seed)
    widths = rng.integers(1, 4, n)
    xs = leaves(rng, *[shape[:-1] + (int(w),) for w in widths])
    fn = lambda: ops.concat(*xs, axis=-1)
    np.testing.assert_array_equal(fn().data, np.concatenate([x.data for x in xs], axis=-1))
    check_gradients(fn, xs, seed)


# ----------------------------------------------------------------------------- linear, embedding

@EXAMPLES
@given(lead=shapes(1, 2, max_side=3), c_in=st.integers(1, 4), c_out=st.integers(1, 4),
       bias=st.booleans(), transpose=st.booleans(), seed=seeds)
def test_linear(lead, c_in, c_out, bias, transpose, seed):
    rng = np.random.default_rng(seed)
    x, w, b = leaves(rng, lead + (c_in,), (c_out, c_in) if transpose else (c_in, c_out), (c_out,))
    b = b if bias else None
    fn = lambda: ops.linear(x, w, b, transpose=transpose)
    expected = x.data @ (w.data.T if transpose else w.data) + (b.data if bias else 0.0)
    np.testing.assert_allclose(fn().data, expected, rtol=1e-13, atol=1e-14)
    check_gradients(fn, [x, w] + ([b] if bias else []), seed)


def test_ops_with_a_computed_weight():
    """Weights are re-read from their leaf in backward; a computed weight has none."""
    rng = np.random.default_rng(0)
    x, w, b = leaves(rng, (4, 3), (3, 2), (3,))
    check_gradients(lambda: ops.linear(x, w * 2.0), [x, w], seed=0)           # a non-leaf weight
    check_gradients(lambda: ops.linear(x, w.data), [x], seed=0)               # a plain array
    check_gradients(lambda: ops.layer_norm(x, b * 3.0, b), [x, b], seed=0)
    check_gradients(lambda: ops.embedding(np.array([0, 2, 2]), w * 2.0), [w], seed=0)


@EXAMPLES
@given(ids_shape=shapes(1, 2), vocab=st.integers(1, 4), c=st.integers(1, 4), seed=seeds)
def test_embedding_repeated_ids(ids_shape, vocab, c, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, ids_shape)                            # a small vocab: ids repeat
    (w,) = leaves(rng, (vocab, c))
    fn = lambda: ops.embedding(ids, w)
    np.testing.assert_array_equal(fn().data, w.data[ids])
    check_gradients(fn, [w], seed)


def test_embedding_gradient_sums_repeated_rows():
    w = Tensor(np.zeros((3, 2)), requires_grad=True)
    ops.embedding(np.array([[0, 2, 0, 0]]), w).backward(np.ones((1, 4, 2)))
    np.testing.assert_array_equal(w.grad, [[3, 3], [0, 0], [1, 1]])   # row 0 used three times


# ----------------------------------------------------------------------------- softmax and attention

@EXAMPLES
@given(lead=shapes(0, 2, max_side=3), t=st.integers(1, 5), causal=st.booleans(), seed=seeds)
def test_softmax(lead, t, causal, seed):
    (x,) = leaves(np.random.default_rng(seed), lead + (t, t))
    p = ops.softmax(x, causal).data
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-14)
    if causal:
        assert (p[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0).all()   # no look-ahead
    scores = np.where(np.triu(np.ones((t, t)), 1) > 0, -np.inf, x.data) if causal else x.data
    np.testing.assert_allclose(p, np.exp(scores) / np.exp(scores).sum(-1, keepdims=True), rtol=1e-13)
    check_gradients(lambda: ops.softmax(x, causal), [x], seed)


def attention_reference(qkv, n_head, keep=None, p=0.0):
    """Head by head, straight from the formula, with the head-major q|k|v layout."""
    B, T, F = qkv.shape
    D = F // (3 * n_head)
    heads = []
    for h in range(n_head):
        q, k, v = (qkv[..., (3 * h + j) * D:(3 * h + j + 1) * D] for j in range(3))   # (B, T, D) each
        s = q @ k.swapaxes(-1, -2) / math.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)                                  # (B, T, T)
        if keep is not None:
            a = a * keep[:, h] / (1 - p)
        heads.append(a @ v)
    return np.concatenate(heads, axis=-1)                              # (B, T, H*D)


@EXAMPLES
@given(b=st.integers(1, 2), t=st.integers(1, 4), n_head=st.integers(1, 3), d=st.integers(1, 3),
       p=st.sampled_from([None, 0.3, 0.6]), seed=seeds)
def test_causal_attention(b, t, n_head, d, p, seed):
    rng = np.random.default_rng(seed)
    (qkv,) = leaves(rng, (b, t, 3 * n_head * d))
    keep = None if p is None else rng.random((b, n_head, t, t)) >= p    # attention-dropout keep mask
    p = 0.0 if p is None else p
    fn = lambda: ops.causal_attention(qkv, n_head, keep, p)
    expected = attention_reference(qkv.data, n_head, keep, p)
    np.testing.assert_allclose(fn().data, expected, rtol=1e-12, atol=1e-14)
    check_gradients(fn, [qkv], seed)


@EXAMPLES
@given(t=st.integers(2, 9), block=st.integers(1, 4), p=st.sampled_from([None, 0.3]), seed=seeds)
def test_blockwise_causal_attention_matches_the_formula(t, block, p, seed):
    """Several query blocks (block < T): values and gradients still those of the full formula."""
    from minipar import transformer_ops
    rng = np.random.default_rng(seed)
    (qkv,) = leaves(rng, (2, t, 3 * 2 * 3))
    keep = None if p is None else rng.random((2, 2, t, t)) >= p
    p = 0.0 if p is None else p
    fn = lambda: ops.causal_attention(qkv, 2, keep, p)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformer_ops, "ATTENTION_BLOCK", block)
        np.testing.assert_allclose(fn().data, attention_reference(qkv.data, 2, keep, p), rtol=1e-12, atol=1e-14)
        check_gradients(fn, [qkv], seed)


# ----------------------------------------------------------------------------- norm, activations, loss

@EXAMPLES
@given(lead=shapes(1, 2, max_side=3), c=st.integers(2, 5), seed=seeds)
def test_layer_norm(lead, c, seed):
    rng = np.random.default_rng(seed)
    x, w, b = leaves(rng, lead + (c,), (c,), (c,))
    fn = lambda: ops.layer_norm(x, w, b)
    mu, var = x.data.mean(-1, keepdims=True), x.data.var(-1, keepdims=True)
    np.testing.assert_allclose(fn().data, (x.data - mu) / np.sqrt(var + 1e-5) * w.data + b.data, rtol=1e-12)
    check_gradients(fn, [x, w, b], seed)


@EXAMPLES
@given(shape=shapes(), seed=seeds)
def test_gelu(shape, seed):
    (x,) = leaves(np.random.default_rng(seed), shape)
    x.data *= 3.0                                                      # reach both tails
    c = math.sqrt(2 / math.pi)
    tanh = np.tanh(c * (x.data + 0.044715 * x.data ** 3))
    np.testing.assert_allclose(ops.gelu(x).data, 0.5 * x.data * (1 + tanh))
    check_gradients(lambda: ops.gelu(x), [x], seed)


@EXAMPLES
@given(shape=shapes(), p=st.sampled_from([0.1, 0.5, 0.9]), seed=seeds)
def test_dropout(shape, p, seed):
    rng = np.random.default_rng(seed)
    (x,) = leaves(rng, shape)
    keep = rng.random(shape) >= p
    np.testing.assert_allclose(ops.dropout(x, keep, p).data, x.data * keep / (1 - p))
    assert ops.dropout(x, keep, 0.0) is x                              # p = 0: no op at all
    check_gradients(lambda: ops.dropout(x, keep, p), [x], seed)


@EXAMPLES
@given(lead=shapes(1, 2, max_side=3), v=st.integers(1, 6), seed=seeds)
def test_cross_entropy_with_ignored_targets(lead, v, seed):
    rng = np.random.default_rng(seed)
    (logits,) = leaves(rng, lead + (v,))
    logits.data *= 3.0
    targets = np.where(rng.random(lead) < 0.3, -1, rng.integers(0, v, lead))
    fn = lambda: ops.cross_entropy(logits, targets)
    z = logits.data.reshape(-1, v)
    logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    y, valid = targets.reshape(-1), targets.reshape(-1) != -1
    expected = -logp[np.arange(y.size), np.where(valid, y, 0)][valid].sum() / max(valid.sum(), 1)
    np.testing.assert_allclose(fn().data, expected, rtol=1e-13, atol=1e-15)
    check_gradients(fn, [logits], seed)


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
    logits = Tensor(np.random.default_rng(0).standard_normal((2, 3, 4)), requires_grad=True)
    loss = ops.cross_entropy(logits, np.full((2, 3), -1))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


# ----------------------------------------------------------------------------- the oracle can fail

def _gelu_backward_without_tanh_term(ctx, g):
    x, t = ctx.saved
    return g * 0.5 * (1.0 + t)                                        # forgot d tanh / dx


def _matmul_backward_without_transpose(ctx, g):
    a, b = ctx.saved
    return g @ b, a @ g                                                # forgot the swapaxes (square shapes)


def _softmax_backward_no_centering(ctx, g):
    (p,) = ctx.saved
    return p * g                                                       # forgot - sum(g p)


@pytest.mark.parametrize("fn_name, target, bug, inputs", [
    ("gelu", ops.GELU, _gelu_backward_without_tanh_term, [(3, 4)]),
    ("matmul", ops.MatMul, _matmul_backward_without_transpose, [(3, 3), (3, 3)]),
    ("softmax", ops.Softmax, _softmax_backward_no_centering, [(3, 3)]),
])
def test_catches_a_wrong_backward(monkeypatch, fn_name, target, bug, inputs):
    tensors = leaves(np.random.default_rng(1), *inputs)
    fn = lambda: getattr(ops, fn_name)(*tensors)
    check_gradients(fn, tensors, seed=1)                               # the real backward passes
    monkeypatch.setattr(target, "backward", staticmethod(bug))
    with pytest.raises(AssertionError, match="finite differences"):
        check_gradients(fn, tensors, seed=1)


def test_catches_an_unbroadcast_that_keeps_size_one_axes(monkeypatch):
    a, b = leaves(np.random.default_rng(2), (3, 1), (1, 4))
    monkeypatch.setattr(tensor, "_unbroadcast", lambda g, shape: g)      # forgot to sum broadcast axes
    with pytest.raises(AssertionError, match="grad shape"):
        check_gradients(lambda: a * b, [a, b], seed=2)
