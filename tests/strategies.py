"""Shared hypothesis strategies, and the finite-difference oracle the gradient tests use.

Import from any test file (pytest puts tests/ on sys.path):

    from strategies import seeds, shapes, gpt_configs, check_gradients

Strategies draw *small* things (every test suite here must stay fast on two cores):
array shapes, broadcastable shape pairs, batched-matmul shapes, reduction axes,
tiny GPTConfigs and token batches for them. Array *values* are never drawn by
hypothesis: a test draws a seed and fills arrays with `rng.standard_normal`, which
is faster and shrinks better than drawing floats one by one.

The oracle compares a backward pass with central differences along a random
direction v (one pair of forward passes per tensor, whatever its size), where
f(x) = <fn(x), w> for a random cotangent w:

    (f(x + h v) - f(x - h v)) / 2h   ~   <df/dx, v>        error O(h^2) + O(eps |f| / h)
"""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minipar.autograd import no_grad
from minipar.nn import GPTConfig

# ----------------------------------------------------------------------------- numbers

seeds = st.integers(0, 2 ** 32 - 1)


def shapes(min_dims=1, max_dims=4, min_side=1, max_side=4):
    """An array shape, e.g. (3, 1, 2)."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def broadcast_pairs(min_dims=0, max_dims=4, max_side=4):
    """Two shapes numpy can broadcast together, e.g. ((2, 1, 3), (4, 1)); () is a 0-d array."""
    return hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=min_dims, max_dims=max_dims,
                                             max_side=max_side).map(lambda b: b.input_shapes)


@st.composite
def matmul_shapes(draw, max_batch_dims=2, max_side=4):
    """(a_shape, b_shape) for a batched a @ b whose leading (batch) axes broadcast:
    a = (*batch_a, n, k), b = (*batch_b, k, m), e.g. ((2, 1, 3, 4), (5, 4, 2))."""
    batch_a, batch_b = draw(broadcast_pairs(0, max_batch_dims, 3))
    n, k, m = (draw(st.integers(1, max_side)) for _ in range(3))
    return batch_a + (n, k), batch_b + (k, m)


@st.composite
def reduce_axes(draw, ndim):
    """An `axis` argument for a reduction over an ndim-array: None, an int or a tuple
    of distinct axes, negative ones included."""
    if ndim == 0:
        return None
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(a - ndim if draw(st.booleans()) else a for a in axes)   # mix in negative spellings


# ----------------------------------------------------------------------------- the model

@st.composite
def gpt_configs(draw, n_layer=st.integers(1, 2), n_head=st.integers(1, 3), head_dim=st.integers(1, 4),
                vocab_size=st.integers(2, 12), seq_len=st.integers(1, 6), tied=st.booleans(),
                dropout=st.just(0.0), precision="fp64"):
    """A tiny, valid GPTConfig; every field is a strategy you may narrow, e.g.
    gpt_configs(n_head=st.just(4), dropout=st.sampled_from([0.0, 0.2]))."""
    heads = draw(n_head)
    return GPTConfig(vocab_size=draw(vocab_size), seq_len=draw(seq_len), n_layer=draw(n_layer),
                     n_head=heads, d_model=heads * draw(head_dim), tied_embeddings=draw(tied),
                     dropout=draw(dropout), precision=precision)


def token_batch(cfg, batch, seed, t=None, ignore_fraction=0.25):
    """(idx, targets) int64 arrays of shape (batch, t) for `cfg`; about `ignore_fraction`
    of the targets are -1 (ignored by the loss), never all of them: targets[0, 0] is
    always scored, so the loss has a gradient. t defaults to cfg.seq_len."""
    rng = np.random.default_rng(seed)
    t = cfg.seq_len if t is None else t
    idx = rng.integers(0, cfg.vocab_size, (batch, t))                       # (B, T)
    targets = rng.integers(0, cfg.vocab_size, (batch, t))                   # (B, T)
    ignored = rng.random((batch, t)) < ignore_fraction
    ignored[0, 0] = False
    targets[ignored] = -1
    return idx, targets


# ----------------------------------------------------------------------------- the oracle

def directional_errors(fn, tensors, seed, h=1e-6):
    """[(name, finite difference, <grad, v>)] for each tensor, one random direction v each.

    `fn()` builds an output Tensor from the tensors' current `.data`. The scalar that
    is differentiated is f = <fn(), w> for a fixed random cotangent w, so backward
    starts from `fn().backward(w)` (a vector-Jacobian product) and no other op is
    needed to reduce the output. fn is called once with gradients and twice per
    tensor without. A tensor that received no gradient counts as a zero gradient."""
    rng = np.random.default_rng(seed)
    for t in tensors:
        t.grad = None
    out = fn()
    w = rng.standard_normal(np.shape(out.data))                     # the cotangent, out's shape
    out.backward(w)
    rows = []
    for i, t in enumerate(tensors):
        grad = np.zeros_like(t.data) if t.grad is None else t.grad
        assert grad.shape == t.data.shape, f"{t.name or i}: grad shape {grad.shape} != {t.data.shape}"
        v = rng.standard_normal(t.data.shape)
        original = t.data.copy()
        with no_grad():
            t.data[...] = original + h * v
            up = float((fn().data * w).sum())
            t.data[...] = original - h * v
            down = float((fn().data * w).sum())
        t.data[...] = original
        rows.append((t.name or f"input {i}", (up - down) / (2 * h), float((grad * v).sum())))
    return rows


def check_gradients(fn, tensors, seed, h=1e-6, rtol=1e-6, atol=1e-8):
    """Assert every directional derivative matches: |fd - an| <= rtol (|fd| + |an|) + atol."""
    rows = directional_errors(fn, tensors, seed, h)
    bad = [(name, fd, an) for name, fd, an in rows if not abs(fd - an) <= rtol * (abs(fd) + abs(an)) + atol]
    assert not bad, "backward disagrees with finite differences: " + "; ".join(
        f"{name}: finite diff {fd:.9g} vs <grad, v> {an:.9g}" for name, fd, an in bad)
