"""DeepSpeed-Ulysses (Jacobs et al. 2023): all-to-all from sequence-split to head-split and back.

Ring attention keeps the heads and passes the sequence around. Ulysses swaps the
split instead: one all-to-all gives every cp rank ALL T tokens of H/cp of the heads,
ordinary causal attention runs on them, and a second all-to-all gives back T/cp
tokens of all heads.

    before   rank r: (B, T/cp, H·3D)    its tokens, every head (packed q k v, head-major)
    a2a      head group j (H/cp heads, contiguous columns) goes to rank j
    after    rank r: (B, T, H/cp·3D)    every token, its head group; serial token order
    attend   serial causal attention on H/cp heads                   (B, T, H/cp·D)
    a2a      token chunk of rank j goes back to rank j               (B, T/cp, H·D)

Under TP "every head" means this rank's H/tp heads, so H must be divisible by tp·cp:
the head-count constraint that limits Ulysses to cp <= H/tp. Tokens arrive rank
after rank (split.all_positions()), so they are permuted into serial order after the
first all-to-all and back before the second; zigzag or contiguous, the attention
sees the serial sequence.

Traffic per rank per layer and micro-batch (an all-to-all sends (cp-1)/cp of the
local buffer, formulas.cp_ulysses_comm_elements):
    forward   qkv 3·b·s·h/(cp·tp) + output b·s·h/(cp·tp)   -> 4·b·s·h/(cp·tp)·(cp-1)/cp
    backward  the same two all-to-alls, reversed            -> 4·b·s·h/(cp·tp)·(cp-1)/cp
so Ulysses' volume per rank falls as 1/cp, while the ring's stays ~2·b·s·h/tp.
"""
import numpy as np

from minipar.autograd import Function
from minipar.backend import array_module, to_device


def _to_heads(x, group, order):
    """(B, T/cp, cp·G) with G a head group's columns -> (B, T, G) in serial token order."""
    B, Tl, F = x.shape
    n = group.size
    out = x.reshape(B, Tl, n, F // n).transpose(2, 0, 1, 3)          # (cp, B, T/cp, G): block j -> rank j
    # all-to-all over cp: head group j of my tokens to rank j, B*T/cp*F elements in and out
    got = group.all_to_all(array_module(x).ascontiguousarray(out))   # (cp, B, T/cp, G): block r from rank r
    rank_order = got.transpose(1, 0, 2, 3).reshape(B, n * Tl, F // n)   # (B, T, G), tokens rank after rank
    return rank_order[:, order]                                       # (B, T, G), serial order


def _to_seq(y, group, inverse):
    """(B, T, G) in serial token order -> (B, T/cp, cp·G): my tokens, every head group."""
    B, T, G = y.shape
    n = group.size
    rank_order = y[:, inverse].reshape(B, n, T // n, G).transpose(1, 0, 2, 3)   # (cp, B, T/cp, G)
    # all-to-all over cp: rank j's tokens of my head group back to rank j, B*T*G elements
    got = group.all_to_all(array_module(y).ascontiguousarray(rank_order))       # (cp, B, T/cp, G): group j
    return got.transpose(1, 2, 0, 3).reshape(B, T // n, n * G)                  # (B, T/cp, cp*G)


class SeqToHeads(Function):
    """Forward _to_heads, backward its inverse _to_seq (the all-to-all reversed)."""

    @staticmethod
    def forward(ctx, x, group, order, inverse):
        ctx.group, ctx.inverse = group, inverse
        return _to_heads(x, group, order)

    @staticmethod
    def backward(ctx, g):
        return _to_seq(g, ctx.group, ctx.inverse)


class HeadsToSeq(Function):
    """Forward _to_seq, backward _to_heads."""

    @staticmethod
    def forward(ctx, y, group, order, inverse):
        ctx.group, ctx.order = group, order
        return _to_seq(y, group, inverse)

    @staticmethod
    def backward(ctx, g):
        return _to_heads(g, ctx.group, ctx.order)


class UlyssesIndex:
    """The token permutations of one split: rank order -> serial order and back (on the device)."""

    def __init__(self, split, xp, count=None):
        order = np.argsort(split.all_positions())      # serial position i sits at rank-order index order[i]
        self.order = to_device(order, xp, count)
        self.inverse = to_device(np.argsort(order), xp, count)


def seq_to_heads(x, group, index):
    return SeqToHeads.apply(x, group=group, order=index.order, inverse=index.inverse)


def heads_to_seq(y, group, index):
    return HeadsToSeq.apply(y, group=group, order=index.order, inverse=index.inverse)
