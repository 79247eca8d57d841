"""Differentiable operations: each a Function with forward and backward side by side.

Conventions: B batch, T sequence, C model width, H heads, D head size (C = H*D),
V vocabulary. Arrays are whatever `array_module` says (NumPy or CuPy). Weights
are read in backward from the leaf tensor (`ctx.inputs[i].data`), never saved,
so a ZeRO-3 gather hook that re-materialised them is honoured. Low-precision
weights (mixed policy) are cast to the activation dtype at use.
"""
import math

from minipar.autograd import Function
from minipar.backend import array_module


def _unbroadcast(g, shape):
    """Sum g down to `shape` (the backward of numpy broadcasting)."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def _shape(x):
    return getattr(x, "shape", ())


def _weight(ctx, i, like):
    """The current value of weight input i, in the dtype of `like`."""
    return ctx.inputs[i].data.astype(like.dtype, copy=False)


# ---- elementwise arithmetic with broadcasting ------------------------------------------
class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (_shape(a), _shape(b))
        return a + b

    @staticmethod
    def backward(ctx, g):
        return _unbroadcast(g, ctx.shapes[0]), _unbroadcast(g, ctx.shapes[1])


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (_shape(a), _shape(b))
        return a - b

    @staticmethod
    def backward(ctx, g):
        return _unbroadcast(g, ctx.shapes[0]), _unbroadcast(-g, ctx.shapes[1])


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        return _unbroadcast(g * b, _shape(a)), _unbroadcast(g * a, _shape(b))


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        return _unbroadcast(g / b, _shape(a)), _unbroadcast(-g * a / (b * b), _shape(b))


# ---- reductions and shape ops --------------------------------------------------------------
class Sum(Function):
    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        xp = array_module(g)
        if ctx.axis is not None and not ctx.keepdims:
            g = xp.expand_dims(g, ctx.axis)
        return xp.broadcast_to(g, ctx.shape).copy()


class Reshape(Function):
    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape)


class Transpose(Function):
    @staticmethod
    def forward(ctx, x, axes=None):
        ctx.axes = axes
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, g):
        xp = array_module(g)
        inverse = None if ctx.axes is None else tuple(xp.argsort(xp.asarray(ctx.axes)).tolist())
        return g.transpose(inverse)


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
        xp = array_module(g)
        cuts = list(xp.cumsum(xp.asarray(ctx.sizes))[:-1].tolist())
        return tuple(xp.split(g, cuts, axis=ctx.axis))


# ---- linear algebra ------------------------------------------------------------------------
class MatMul(Function):
    """Batched a @ b over the last two axes; leading axes broadcast."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        ga = g @ b.swapaxes(-1, -2)
        gb = a.swapaxes(-1, -2) @ g
        return _unbroadcast(ga, a.shape), _unbroadcast(gb, b.shape)


class Linear(Function):
    """y = x W + b with W of shape (C_in, C_out); `transpose=True` uses W^T (tied head).

    Backward: dX = dY W^T now; dW = X^T dY and db = sum dY either now, or, when the
    engine passes a wgrad queue, as a closure run later (zero-bubble "W" step).
    """

    @staticmethod
    def forward(ctx, x, w, b=None, transpose=False):
        x2 = x.reshape(-1, x.shape[-1])                      # (B*T, C_in)
        wc = w.astype(x.dtype, copy=False)
        y = x2 @ (wc.T if transpose else wc)                 # (B*T, C_out)
        if b is not None:
            y += b.astype(x.dtype, copy=False)
        ctx.transpose, ctx.x_shape = transpose, x.shape
        ctx.save_for_backward(x2)
        return y.reshape(*x.shape[:-1], y.shape[-1])         # (B, T, C_out)

    @staticmethod
    def backward(ctx, g):
        (x2,) = ctx.saved
        g2 = g.reshape(-1, g.shape[-1])                      # (B*T, C_out)
        w = _weight(ctx, 1, g2)
        dx = (g2 @ w if ctx.transpose else g2 @ w.T).reshape(ctx.x_shape)   # (B, T, C_in)
        w_leaf, b_leaf = ctx.inputs[1], ctx.inputs[2] if len(ctx.inputs) > 2 else None
        need_w, need_b = ctx.needs_grad[1], len(ctx.needs_grad) > 2 and ctx.needs_grad[2]

        def weight_grads():
            dw = g2.T @ x2 if ctx.transpose else x2.T @ g2   # W's shape
            db = g2.sum(axis=0) if need_b else None
            return dw, db

        if ctx.wgrad_queue is None:
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
    """out[b, t] = W[ids[b, t]]; backward scatter-adds rows (np.add.at)."""

    @staticmethod
    def forward(ctx, ids, w, dtype=None):
        ctx.ids = ids
        out = w[ids]                                          # (B, T, C)
        return out.astype(dtype or w.dtype, copy=False)

    @staticmethod
    def backward(ctx, g):
        xp = array_module(g)
        w = ctx.inputs[1].data
        dw = xp.zeros(w.shape, dtype=g.dtype)
        xp.add.at(dw, ctx.ids.reshape(-1), g.reshape(-1, g.shape[-1]))   # (B*T, C) rows into (V, C)
        return None, dw


# ---- attention -----------------------------------------------------------------------------
def _causal_mask(xp, t):
    return xp.triu(xp.ones((t, t), dtype=bool), k=1)          # True above the diagonal = future


def _softmax_(scores, mask):
    """In-place masked softmax over the last axis."""
    xp = array_module(scores)
    if mask is not None:
        scores[..., mask] = -xp.inf
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


class Softmax(Function):
    """softmax over the last axis; `causal=True` masks j > i in the last two axes."""

    @staticmethod
    def forward(ctx, x, causal=False):
        mask = _causal_mask(array_module(x), x.shape[-1]) if causal else None
        p = _softmax_(x.copy(), mask)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved
        return p * (g - (g * p).sum(axis=-1, keepdims=True))


class CausalAttention(Function):
    """softmax(Q K^T / sqrt(D) + causal mask) V for all heads in one batched matmul.

    Input is the packed projection qkv of shape (B, T, H*3*D), laid out head-major
    ([head 0: q k v | head 1: q k v | ...]) so that splitting it into contiguous
    blocks hands whole heads to tensor-parallel ranks. Output: (B, T, H*D).
    """

    @staticmethod
    def forward(ctx, qkv, n_head, keep=None, p=0.0):
        B, T, F = qkv.shape
        D = F // (3 * n_head)
        q, k, v = qkv.reshape(B, T, n_head, 3, D).transpose(3, 0, 2, 1, 4)   # 3 x (B, H, T, D)
        scale = 1.0 / math.sqrt(D)
        att = _softmax_((q @ k.swapaxes(-1, -2)) * scale, _causal_mask(array_module(qkv), T))   # (B, H, T, T)
        dropped = att if keep is None else att * keep * (1.0 / (1.0 - p))    # attention dropout
        y = dropped @ v                                                       # (B, H, T, D)
        ctx.save_for_backward(q, k, v, att, keep)
        ctx.scale, ctx.p = scale, p
        return y.transpose(0, 2, 1, 3).reshape(B, T, n_head * D)             # (B, T, H*D)

    @staticmethod
    def backward(ctx, g):
        q, k, v, att, keep = ctx.saved
        B, H, T, D = q.shape
        xp = array_module(g)
        gy = g.reshape(B, T, H, D).transpose(0, 2, 1, 3)                     # (B, H, T, D)
        dropped = att if keep is None else att * keep * (1.0 / (1.0 - ctx.p))
        dv = dropped.swapaxes(-1, -2) @ gy                                    # (B, H, T, D)
        datt = gy @ v.swapaxes(-1, -2)                                        # (B, H, T, T)
        if keep is not None:
            datt *= keep * (1.0 / (1.0 - ctx.p))
        ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True)) * ctx.scale
        dq = ds @ k                                                           # (B, H, T, D)
        dk = ds.swapaxes(-1, -2) @ q                                          # (B, H, T, D)
        dqkv = xp.stack((dq, dk, dv), axis=3)                                 # (B, H, T, 3, D)
        return dqkv.transpose(0, 2, 1, 3, 4).reshape(B, T, H * 3 * D), None  # (B, T, H*3*D)


# ---- normalisation, nonlinearity, dropout -------------------------------------------------------
class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis (Ba et al. 2016)."""

    @staticmethod
    def forward(ctx, x, w, b, eps=1e-5):
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        rstd = 1.0 / array_module(x).sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
        xhat = xc * rstd
        ctx.save_for_backward(xhat, rstd)
        return xhat * w.astype(x.dtype, copy=False) + b.astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd = ctx.saved
        lead = tuple(range(g.ndim - 1))
        dw, db = (g * xhat).sum(axis=lead), g.sum(axis=lead)
        dxhat = g * _weight(ctx, 1, g)
        dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                     - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, dw, db


_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """GELU, tanh form (Hendrycks & Gimpel 2016): 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))."""

    @staticmethod
    def forward(ctx, x):
        t = array_module(x).tanh(_GELU_C * (x + 0.044715 * x * x * x))
        ctx.save_for_backward(x, t)
        return 0.5 * x * (1.0 + t)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved
        dt = (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
        return g * (0.5 * (1.0 + t) + 0.5 * x * dt)


class Dropout(Function):
    """y = x * mask / (1 - p); the boolean keep-mask is supplied by the caller (seeded)."""

    @staticmethod
    def forward(ctx, x, keep, p):
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        return x * keep * ctx.scale

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved
        return g * keep * ctx.scale


# ---- loss ----------------------------------------------------------------------------------
class CrossEntropy(Function):
    """Mean over non-ignored targets of -log softmax(logits)[target], fused and stable:
    log p_y = z_y - m - log sum_j exp(z_j - m), m = max_j z_j."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-1):
        xp = array_module(logits)
        z = logits.reshape(-1, logits.shape[-1])                  # (B*T, V)
        y = targets.reshape(-1)                                   # (B*T,)
        valid = y != ignore_index
        count = max(int(valid.sum()), 1)
        z = z - z.max(axis=-1, keepdims=True)
        p = xp.exp(z)
        sumexp = p.sum(axis=-1, keepdims=True)
        p /= sumexp
        rows = xp.arange(y.size)
        safe_y = xp.where(valid, y, 0)
        nll = xp.log(sumexp[:, 0]) - z[rows, safe_y]
        ctx.save_for_backward(p)
        ctx.safe_y, ctx.valid, ctx.count, ctx.shape = safe_y, valid, count, logits.shape
        return (nll * valid).sum() / count

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved
        d = p.copy()
        d[array_module(p).arange(d.shape[0]), ctx.safe_y] -= 1.0
        d *= (ctx.valid[:, None] * (g / ctx.count)).astype(d.dtype)
        return d.reshape(ctx.shape), None


# ---- functional wrappers ------------------------------------------------------------------
add, sub, mul, div = Add.apply, Sub.apply, Mul.apply, Div.apply
matmul, gelu, layer_norm = MatMul.apply, GELU.apply, LayerNorm.apply
reshape, transpose, concat = Reshape.apply, Transpose.apply, Concat.apply


def sum(x, axis=None, keepdims=False):   # noqa: A001 - mirrors numpy's name
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    n = x.data.size if axis is None else math.prod(
        x.shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
    return mul(sum(x, axis, keepdims), 1.0 / n)


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
    return CausalAttention.apply(qkv, n_head=n_head, keep=keep, p=p)


def dropout(x, keep, p):
    return x if p == 0.0 else Dropout.apply(x, keep, p)


def cross_entropy(logits, targets, ignore_index=-1):
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index)

