"""The transformer's own ops: attention, layer norm, GELU, dropout, cross-entropy.

Each is one fused Function with forward and backward side by side, so that
no Python loop runs over heads or tokens and every saved array is one the
backward really needs. Shapes: B batch, T sequence, H heads, D head size, V vocab.
"""
import math

from minipar.tensor import Function
from minipar.backend import array_module


# ---- attention -----------------------------------------------------------------------------
ATTENTION_BLOCK = 64   # query rows per block of the causal attention (see CausalAttention)


def _causal_mask(xp, t, dtype):
    """(t, t) additive mask: 0 on and below the diagonal, -inf above it (the future)."""
    return xp.triu(xp.full((t, t), -xp.inf, dtype=dtype), k=1)


def _softmax_(scores):
    """In place over the last axis: exp(s - max s) / sum exp(s - max s). Three passes and a
    reciprocal per row; rows whose scores are -inf except one are safe (max is finite)."""
    xp = array_module(scores)
    scores -= scores.max(axis=-1, keepdims=True)
    xp.exp(scores, out=scores)
    scores *= 1.0 / scores.sum(axis=-1, keepdims=True)
    return scores


class Softmax(Function):
    """softmax over the last axis; `causal=True` masks j > i in the last two axes."""

    @staticmethod
    def forward(ctx, x, causal=False):
        p = x.copy()
        if causal:
            p += _causal_mask(array_module(x), x.shape[-1], x.dtype)
        ctx.save_for_backward(_softmax_(p))
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved
        return p * (g - (g * p).sum(axis=-1, keepdims=True))


def _blocks(t, block):
    """Query blocks [r0, r1) of at most `block` rows; block i attends to keys [0, r1)."""
    return [(r0, min(r0 + block, t)) for r0 in range(0, t, block)]


def attention_forward(qs, k, v, keep=None, p=0.0, block=None, out=None):
    """Causal softmax(qs k^T + M) v, blockwise over queries, skipping keys wholly in the future.

    qs, k, v: (B, H, T, D), q already scaled by 1/sqrt(D). Query block [r0, r1) only
    meets keys [0, r1): its scores are (B, H, r1 - r0, r1) and only their last
    (r1 - r0) columns need the mask M. With n = T / block blocks the score arrays
    hold B H T^2 (n + 1) / (2 n) numbers in all (n = 1: the full B H T^2), and the
    matmuls and the softmax do that fraction of the full causal work.
    Returns y (B, H, T, D) (written into `out` if given) and the list of the blocks'
    attention probabilities (what backward needs)."""
    xp = array_module(qs)
    B, H, T, D = qs.shape
    block = block or ATTENTION_BLOCK
    y = xp.empty((B, H, T, D), dtype=qs.dtype) if out is None else out
    probs = []
    for r0, r1 in _blocks(T, block):
        s = qs[:, :, r0:r1] @ k[:, :, :r1].swapaxes(-1, -2)         # (B, H, r1-r0, r1)
        s[..., r0:] += _causal_mask(xp, r1 - r0, s.dtype)            # the diagonal block's future
        a = _softmax_(s)
        if keep is not None:                                         # attention dropout
            a = a * keep[:, :, r0:r1, :r1] * (1.0 / (1.0 - p))
        xp.matmul(a, v[:, :, :r1], out=y[:, :, r0:r1])               # (B, H, r1-r0, D)
        probs.append(s)
    return y, probs


def attention_backward(gy, qs, k, v, probs, keep=None, p=0.0, scale=1.0, block=None, out=None):
    """Gradients of attention_forward, block by block: with A = softmax(S), Y = A' V
    (A' = A with dropout), S = scale q k^T:

        dV = A'^T dY      dA = dY V^T (times the dropout mask)
        dS = A * (dA - rowsum(dA * A))      dq = scale dS k      dk = dS^T qs

    dq, dk, dv: (B, H, T, D) each, written into `out` = (dq, dk, dv) views if given."""
    xp = array_module(gy)
    B, H, T, D = qs.shape
    block = block or ATTENTION_BLOCK
    if out is None:
        out = tuple(xp.empty((B, H, T, D), dtype=gy.dtype) for _ in range(3))
    dq, dk, dv = out
    dk[...] = 0
    dv[...] = 0
    for (r0, r1), a in zip(_blocks(T, block), probs):
        g = gy[:, :, r0:r1]                                          # (B, H, r1-r0, D)
        da = g @ v[:, :, :r1].swapaxes(-1, -2)                       # (B, H, r1-r0, r1)
        if keep is None:
            dv[:, :, :r1] += a.swapaxes(-1, -2) @ g
        else:
            mask = keep[:, :, r0:r1, :r1] * (1.0 / (1.0 - p))
            dv[:, :, :r1] += (a * mask).swapaxes(-1, -2) @ g
            da *= mask
        ds = a * da                                                  # dS = A dA - A rowsum(A dA)
        rows = ds.sum(axis=-1, keepdims=True)
        xp.multiply(a, rows, out=da)
        ds -= da
        xp.matmul(ds, k[:, :, :r1], out=dq[:, :, r0:r1])
        dk[:, :, :r1] += ds.swapaxes(-1, -2) @ qs[:, :, r0:r1]
    dq *= scale
    return dq, dk, dv


class CausalAttention(Function):
    """softmax(Q K^T / sqrt(D) + causal mask) V for all heads in batched matmuls,
    blockwise over queries (attention_forward): no work on key blocks wholly in the future.

    Input is the packed projection qkv of shape (B, T, H*3*D), laid out head-major
    ([head 0: q k v | head 1: q k v | ...]) so that splitting it into contiguous
    blocks hands whole heads to tensor-parallel ranks. Output: (B, T, H*D).
    Saved for backward: q (scaled), k, v (3 B T H D) and the blocks' probabilities,
    B H T^2 (n + 1) / (2 n) for n = T / ATTENTION_BLOCK query blocks.
    """

    @staticmethod
    def forward(ctx, qkv, n_head, keep=None, p=0.0):
        xp = array_module(qkv)
        B, T, F = qkv.shape
        D = F // (3 * n_head)
        # one copy into (3, B, H, T, D): contiguous q, k, v feed the matmuls; q is scaled in place
        q, k, v = xp.ascontiguousarray(qkv.reshape(B, T, n_head, 3, D).transpose(3, 0, 2, 1, 4))
        scale = 1.0 / math.sqrt(D)
        q *= scale
        y = xp.empty((B, T, n_head, D), dtype=qkv.dtype)
        _, probs = attention_forward(q, k, v, keep, p, out=y.transpose(0, 2, 1, 3))   # y as (B, H, T, D)
        ctx.save_for_backward(q, k, v, keep, *probs)
        ctx.scale, ctx.p = scale, p
        return y.reshape(B, T, n_head * D)                                    # (B, T, H*D)

    @staticmethod
    def backward(ctx, g):
        q, k, v, keep, *probs = ctx.saved
        B, H, T, D = q.shape
        xp = array_module(g)
        gy = g.reshape(B, T, H, D).transpose(0, 2, 1, 3)                     # (B, H, T, D)
        dqkv = xp.empty((B, T, H, 3, D), dtype=g.dtype)
        views = dqkv.transpose(3, 0, 2, 1, 4)                                # (3, B, H, T, D)
        attention_backward(gy, q, k, v, probs, keep, ctx.p, ctx.scale, out=(views[0], views[1], views[2]))
        return dqkv.reshape(B, T, H * 3 * D), None                           # (B, T, H*3*D)


# ---- normalisation, nonlinearity, dropout -------------------------------------------------------
class LayerNorm(Function):
    """y = xhat w + b, xhat = (x - mean) / sqrt(var + eps), over the last axis (Ba et al. 2016).

    Backward, with C the width and dxhat = dy w:
        dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)),  dw = sum dy xhat,  db = sum dy
    Row sums of products go through einsum (no temporaries), column sums over the
    rows through a matrix-vector product (one BLAS pass)."""

    @staticmethod
    def forward(ctx, x, w, b, eps=1e-5):
        xp = array_module(x)
        c = x.shape[-1]
        xhat = x - x.mean(axis=-1, keepdims=True)
        var = xp.einsum("...c,...c->...", xhat, xhat)[..., None] * (1.0 / c)   # (..., 1)
        rstd = 1.0 / xp.sqrt(var + eps)
        xhat *= rstd
        ctx.save_for_backward(xhat, rstd)
        ctx.keep_weight(1, w)
        y = xhat * w.astype(x.dtype, copy=False)
        y += b.astype(x.dtype, copy=False)
        return y

    @staticmethod
    def backward(ctx, g):
        xhat, rstd = ctx.saved
        xp = array_module(g)
        c = g.shape[-1]
        g2, xhat2 = g.reshape(-1, c), xhat.reshape(-1, c)           # (N, C)
        ones = xp.ones(g2.shape[0], dtype=g.dtype)
        dxhat = g * ctx.weight(1, like=g)
        dw = ones @ (g2 * xhat2)                                     # column sums (C,)
        db = ones @ g2
        mean_dxhat = dxhat.mean(axis=-1, keepdims=True)
        mean_dxhat_xhat = xp.einsum("...c,...c->...", dxhat, xhat)[..., None] * (1.0 / c)
        dx = xhat * mean_dxhat_xhat
        xp.subtract(dxhat, dx, out=dx)
        dx -= mean_dxhat
        dx *= rstd
        return dx, dw, db


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


ELEMENTWISE_CHUNK = 1 << 16     # elements per chunk of a fused elementwise chain (256 KiB in fp32)


def _chunks(n):
    """Slices of ELEMENTWISE_CHUNK elements covering range(n): a chain of in-place passes
    runs chunk by chunk, so each chunk stays in the core's cache for all of its passes."""
    return [slice(i, i + ELEMENTWISE_CHUNK) for i in range(0, n, ELEMENTWISE_CHUNK)]


class GELU(Function):
    """GELU, tanh form (Hendrycks & Gimpel 2016):

        y  = 0.5 x (1 + t),   t = tanh(u),   u = c x (1 + a x^2),   c = sqrt(2/pi), a = 0.044715
        dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)

    Forward keeps t for backward (no second tanh); both run in place, chunk by chunk."""

    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        x1 = x.reshape(-1)                                           # (n,)
        t, y = xp.empty_like(x1), xp.empty_like(x1)
        for c in _chunks(x1.size):
            xc, tc, yc = x1[c], t[c], y[c]
            xp.multiply(xc, xc, out=tc)
            tc *= _GELU_A
            tc += 1.0
            tc *= xc
            tc *= _GELU_C                                            # u
            xp.tanh(tc, out=tc)                                      # t = tanh(u)
            xp.add(tc, 1.0, out=yc)
            yc *= xc
            yc *= 0.5                                                # y = 0.5 x (1 + t)
        ctx.save_for_backward(x, t.reshape(x.shape))
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved
        xp = array_module(g)
        x1, t1, g1 = x.reshape(-1), t.reshape(-1), g.reshape(-1)     # (n,) each
        d = xp.empty_like(g1)
        s = xp.empty(min(ELEMENTWISE_CHUNK, d.size), dtype=d.dtype)   # one chunk of scratch
        for c in _chunks(d.size):
            xc, tc, dc = x1[c], t1[c], d[c]
            sc = s[:dc.size]
            xp.multiply(xc, xc, out=dc)
            dc *= 3 * _GELU_A * _GELU_C
            dc += _GELU_C                                            # c (1 + 3 a x^2)
            xp.multiply(tc, tc, out=sc)
            xp.subtract(1.0, sc, out=sc)                             # 1 - t^2
            dc *= sc
            dc *= xc
            dc += tc
            dc += 1.0
            dc *= 0.5                                                # 0.5 (1 + t) + 0.5 x dt
            dc *= g1[c]
        return d.reshape(g.shape)


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
