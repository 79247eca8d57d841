"""Differentiable tensor operations: each a Function with forward and backward side by side.

Slicing, concatenation, linear and embedding live here; the arithmetic that
Tensor's operators record (add, mul, sum, reshape, matmul, ...) lives in
tensor.py and the transformer-specific ops (attention, layer norm, GELU,
dropout, cross-entropy) in transformer_ops.py; both are re-exported here, so
ops.X is the one place to look.

Conventions: B batch, T sequence, C model width, H heads, D head size (C = H*D),
V vocabulary. Arrays are whatever `array_module` says (NumPy or CuPy). Weights
are read in backward from the leaf tensor (`ctx.inputs[i].data`), never saved,
so a ZeRO-3 gather hook that re-materialised them is honoured. Low-precision
weights (mixed policy) are cast to the activation dtype at use.
"""
import itertools

from minipar.backend import array_module, like, scatter_add_rows
from minipar.tensor import (  # noqa: F401  (re-exported: ops.X is the one place to look)
    Add, Div, MatMul, Mul, Reshape, Sub, Sum, Transpose, add, div, matmul, mean, mul, reshape, sub,
    sum, transpose)
from minipar.tensor import Function
from minipar.transformer_ops import (  # noqa: F401  (re-exported)
    GELU, CausalAttention, CrossEntropy, Dropout, LayerNorm, Softmax)


class Slice(Function):
    """x[index] for a basic index (slices/ints); backward scatters into zeros."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape, ctx.dtype, ctx.index = x.shape, x.dtype, index
        return x[index]

    @staticmethod
    def backward(ctx, g):
        out = array_module(g).zeros(ctx.shape, dtype=g.dtype)
        out[ctx.index] = g
        return out


class Concat(Function):
    @staticmethod
    def forward(ctx, *xs, axis=0):
        ctx.axis, ctx.sizes = axis, [x.shape[axis] for x in xs]
        return array_module(xs[0]).concatenate(xs, axis=axis)

    @staticmethod
    def backward(ctx, g):
        cuts = list(itertools.accumulate(ctx.sizes))[:-1]     # split points, host ints
        return tuple(array_module(g).split(g, cuts, axis=ctx.axis))


# ---- linear algebra ------------------------------------------------------------------------
def affine(x2, w, b=None, transpose=False):
    """x2 W + b (or x2 W^T + b) for x2 (N, C_in), in x2's dtype: Linear's forward arithmetic."""
    wc = w.astype(x2.dtype, copy=False)
    y = x2 @ (wc.T if transpose else wc)                     # (N, C_out)
    if b is not None:
        y += b.astype(x2.dtype, copy=False)
    return y


class Linear(Function):
    """y = x W + b with W of shape (C_in, C_out); `transpose=True` uses W^T (tied head).

    Backward: dX = dY W^T now; dW = X^T dY and db = sum dY either now, or, when the
    engine passes a wgrad queue, as a closure run later (zero-bubble "W" step).
    """

    @staticmethod
    def forward(ctx, x, w, b=None, transpose=False):
        x2 = x.reshape(-1, x.shape[-1])                      # (B*T, C_in)
        ctx.transpose, ctx.x_shape = transpose, x.shape
        ctx.save_for_backward(x2)
        ctx.keep_weight(1, w)
        return affine(x2, w, b, transpose).reshape(*x.shape[:-1], -1)   # (B, T, C_out)

    @staticmethod
    def backward(ctx, g):
        (x2,) = ctx.saved
        g2 = g.reshape(-1, g.shape[-1])                      # (B*T, C_out)
        w = ctx.weight(1, like=g2)
        dx = (g2 @ w if ctx.transpose else g2 @ w.T).reshape(ctx.x_shape)   # (B, T, C_in)
        w_leaf, b_leaf = ctx.inputs[1], ctx.inputs[2] if len(ctx.inputs) > 2 else None
        need_w, need_b = ctx.needs_grad[1], len(ctx.needs_grad) > 2 and ctx.needs_grad[2]

        def weight_grads():
            dw = g2.T @ x2 if ctx.transpose else x2.T @ g2   # W's shape
            db = array_module(g2).ones(g2.shape[0], dtype=g2.dtype) @ g2 if need_b else None   # column sums
            return dw, db

        if ctx.wgrad_queue is None or w_leaf is None or (need_b and b_leaf is None):
            # no W queue, or a computed weight/bias (its gradient must flow on now)
            dw, db = weight_grads()
            return dx, (dw if need_w else None), db

        def deferred():                                      # the "W" action
            dw, db = weight_grads()
            if need_w:
                w_leaf.accumulate_grad(dw)
            if need_b:
                b_leaf.accumulate_grad(db)
        ctx.defer(deferred)
        return dx, None, None


# ---- embedding -----------------------------------------------------------------------------
class Embedding(Function):
    """out[b, t] = W[ids[b, t]]; backward scatter-adds rows (np.add.at: a token seen twice adds twice)."""

    @staticmethod
    def forward(ctx, ids, w, dtype=None):
        ctx.ids = ids
        ctx.keep_weight(1, w)
        out = w[ids]                                          # (B, T, C)
        return out.astype(dtype or w.dtype, copy=False)

    @staticmethod
    def backward(ctx, g):
        dw = array_module(g).zeros(ctx.weight(1).shape, dtype=g.dtype)
        scatter_add_rows(dw, ctx.ids.reshape(-1), g.reshape(-1, g.shape[-1]))   # (B*T, C) rows into (V, C)
        return None, dw


# ---- functional wrappers (the arithmetic's live in tensor.py) -----------------------------------
gelu, layer_norm, concat = GELU.apply, LayerNorm.apply, Concat.apply


def getitem(x, index):
    return Slice.apply(x, index=index)


def split(x, sizes, axis=-1):
    """Split along `axis` into pieces of the given sizes (each piece a Slice)."""
    out, start = [], 0
    for n in sizes:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, start + n)
        out.append(getitem(x, tuple(index)))
        start += n
    return out


def linear(x, w, b=None, transpose=False):
    return Linear.apply(x, w, b, transpose=transpose)


def embedding(ids, w, dtype=None):
    return Embedding.apply(ids, w, dtype=dtype)


def softmax(x, causal=False):
    return Softmax.apply(x, causal=causal)


def causal_attention(qkv, n_head, keep=None, p=0.0):
    keep = None if keep is None else like(keep, qkv.data)       # host-drawn mask -> the data's device
    return CausalAttention.apply(qkv, n_head=n_head, keep=keep, p=p)


def dropout(x, keep, p):
    return x if p == 0.0 else Dropout.apply(x, like(keep, x.data), p)


def cross_entropy(logits, targets, ignore_index=-1):
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index)

