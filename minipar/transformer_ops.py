"""The transformer's own ops: attention, layer norm, GELU, dropout, cross-entropy.

Each is one fused Function with forward and backward side by side, so that
no Python loop runs over heads or tokens and every saved array is one the
backward really needs. Shapes: B batch, T sequence, H heads, D head size, V vocab.
"""
import math

from minipar.autograd import Function
from minipar.backend import array_module


def _weight(ctx, i, like):
    """The current value of weight input i, in the dtype of `like`."""
    return ctx.weight(i).astype(like.dtype, copy=False)


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
        ctx.keep_weight(1, w)
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
