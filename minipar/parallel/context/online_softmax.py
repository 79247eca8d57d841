"""Attention one block at a time, and the log-sum-exp merge that makes it exact.

For queries q (…, Lq, D) and one block of keys/values k, v (…, Lk, D), with scores
S = q k^T / sqrt(D) (Milakov & Gimelshein 2018; Dao et al. 2022, FlashAttention;
Liu et al. 2023, Ring Attention):

    m   = max_j S_ij                         (…, Lq)   the row max, for stability
    l   = sum_j exp(S_ij - m)                (…, Lq)
    lse = m + log l                          (…, Lq)   log sum_j exp(S_ij)
    o   = sum_j exp(S_ij - lse) drop_ij V_j  (…, Lq, D) the block's normalised output

Two partial results over disjoint key sets A and B merge into the result over A ∪ B:

    lse = log(exp(lse_A) + exp(lse_B))                    (logaddexp, stable)
    o   = exp(lse_A - lse) o_A + exp(lse_B - lse) o_B

since exp(lse_X - lse) is the share of the softmax mass that lies in X. Attention
dropout multiplies the normalised probabilities elementwise (drop = keep / (1 - p)),
so it is linear inside each block and merges the same way.

Backward of a block, given dO and the *final* o and lse of its query rows (so
P_ij = exp(S_ij - lse_i) are the true probabilities, recomputed, never stored):

    delta_i = sum_d dO_id o_id                            = sum_j P_ij dP_ij
    dV     += (P drop)^T dO
    dP      = (dO V^T) drop
    dS      = P (dP - delta) / sqrt(D)
    dQ     += dS K,   dK += dS^T Q

Each forward block costs 2 matmuls (4·Lq·Lk·D FLOPs per head), each backward block 5
(S again, dP, dV, dQ, dK: 10·Lq·Lk·D).
"""
from minipar.backend import array_module

FORWARD_MATMULS, BACKWARD_MATMULS = 2, 5


def causal_triangle(xp, n):
    """(n, n) True above the diagonal: the future inside a diagonal block."""
    return xp.triu(xp.ones((n, n), dtype=bool), k=1)


def scores(q, k, scale, masked):
    """S = q k^T * scale (…, Lq, Lk), the future set to -inf when `masked` (a diagonal block)."""
    s = (q @ k.swapaxes(-1, -2)) * scale
    if masked:
        s[..., causal_triangle(array_module(s), s.shape[-1])] = -array_module(s).inf
    return s


def block_forward(q, k, v, scale, masked, drop=None):
    """(o, lse) of queries q against one key block: o (…, Lq, D), lse (…, Lq).
    `drop` (…, Lq, Lk) is keep / (1 - p), or None without attention dropout."""
    xp = array_module(q)
    s = scores(q, k, scale, masked)
    m = s.max(axis=-1, keepdims=True)                       # (…, Lq, 1)
    e = xp.exp(s - m)                                       # (…, Lq, Lk)
    l = e.sum(axis=-1, keepdims=True)                       # (…, Lq, 1)
    if drop is not None:
        e = e * drop
    o = (e @ v) / l                                         # (…, Lq, D)
    return o, (m + xp.log(l))[..., 0]                       # (…, Lq, D), (…, Lq)


def merge(o, lse, o_b, lse_b):
    """The result over both key sets: (o, lse) merged with a block's (o_b, lse_b)."""
    xp = array_module(o)
    new = xp.logaddexp(lse, lse_b)                          # (…, Lq)
    return xp.exp(lse - new)[..., None] * o + xp.exp(lse_b - new)[..., None] * o_b, new


def block_backward(q, k, v, do, lse, delta, scale, masked, drop=None):
    """(dq, dk, dv) of one block pair, from the final lse and delta = rowsum(dO * o)."""
    xp = array_module(q)
    p = xp.exp(scores(q, k, scale, masked) - lse[..., None])          # (…, Lq, Lk): true probabilities
    pd = p if drop is None else p * drop
    dv = pd.swapaxes(-1, -2) @ do                                     # (…, Lk, D)
    dp = do @ v.swapaxes(-1, -2)                                      # (…, Lq, Lk)
    if drop is not None:
        dp *= drop
    ds = p * (dp - delta[..., None]) * scale                          # (…, Lq, Lk)
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv                        # (…, Lq, D), (…, Lk, D) x2
