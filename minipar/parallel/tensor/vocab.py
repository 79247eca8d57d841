"""Vocabulary parallelism (Megatron-LM, Shoeybi et al. 2019, §3): the V axis split over tp.

The token table wte (V, C) and the logits (B, T, V) are the largest things a small
GPT has. Each tp rank holds V/tp rows of wte and produces only its V/tp columns
of the logits; the full logits never exist on any rank:

    wte (V, C), split along V          logits (B, T, V), split along V
    +-------------------+              +------+------+------+------+
    | rows v0..v1: rank0|              | V/tp | V/tp | V/tp | V/tp |
    |-------------------|              | rank0| rank1| rank2| rank3|
    | rows ...  : rank1 |              +------+------+------+------+
    |  ...              |
    +-------------------+

* embedding: rank t looks up the ids in [v0, v1) and writes 0 for the others; the
  partial outputs summed over tp (g, or reduce-scatter along T under SP) are exactly
  the serial lookup, since one rank holds each id. The tied head x wte^T is a
  column-parallel matmul with wte_t^T: this rank's V/tp columns of the logits.
* cross-entropy, stable form  -log p_y = log sum_j exp(z_j - m) - (z_y - m),
  with m = max_j z_j. Three things need the whole row, each an all-reduce over tp
  of one number per row: the global max m, sum_j exp(z_j - m) and z_y (held by one
  rank). The gradient softmax(z) - onehot(y) is then local to each rank's columns.
* argmax for greedy prediction: the global max by all-reduce, then the smallest
  column index attaining it (an all-reduce of -index with max).
"""
from dataclasses import dataclass

from minipar.autograd import Function
from minipar.backend import array_module, scatter_add_rows


def vocab_range(vocab_size, group):
    """(v0, v1): the ids this tp rank holds."""
    per_rank = vocab_size // group.size
    return group.rank * per_rank, (group.rank + 1) * per_rank


class PartialLookup(Function):
    """out[b, t] = W[ids[b, t] - v0] if v0 <= ids[b, t] < v1 else 0;  W is (V/tp, C)."""

    @staticmethod
    def forward(ctx, ids, w, v0, dtype=None):
        xp = array_module(w)
        local = ids - v0                                            # (B, T) local row index
        mine = (local >= 0) & (local < w.shape[0])                  # (B, T) held by this rank
        ctx.rows, ctx.mine = xp.where(mine, local, 0), mine
        out = w[ctx.rows].astype(dtype or w.dtype)                  # (B, T, C)
        out[~mine] = 0                                              # ids of other ranks give 0
        return out

    @staticmethod
    def backward(ctx, g):
        dw = array_module(g).zeros(ctx.inputs[1].data.shape, dtype=g.dtype)   # (V/tp, C)
        scatter_add_rows(dw, ctx.rows[ctx.mine], g[ctx.mine])       # (n_mine, C) rows into (V/tp, C)
        return None, dw


def global_max(z, group):
    """m = max over the whole vocabulary of each row of z (N, V/tp): shape (N,)."""
    # all-reduce (max) over tp: one float per row, N = B*T elements
    return group.all_reduce(z.max(axis=-1), op="max")


class VocabParallelCrossEntropy(Function):
    """Mean over non-ignored targets of -log softmax(z)[y], z split along V over tp."""

    @staticmethod
    def forward(ctx, logits, targets, group, v0, ignore_index=-1):
        xp = array_module(logits)
        z = logits.reshape(-1, logits.shape[-1])                    # (N, V/tp), N = B*T
        y = targets.reshape(-1)                                     # (N,) global ids
        valid = y != ignore_index
        count = max(int(valid.sum()), 1)
        z = z - global_max(z, group)[:, None]                       # z_j - m, (N, V/tp)
        e = xp.exp(z)
        local = y - v0
        mine = valid & (local >= 0) & (local < z.shape[1])          # this rank holds column y
        rows, cols = xp.arange(y.size), xp.where(mine, local, 0)
        row_sums = xp.stack([e.sum(axis=-1), xp.where(mine, z[rows, cols], 0.0)])   # (2, N)
        # all-reduce (sum) over tp: sum_j exp(z_j - m) and z_y - m, 2*N elements
        sumexp, z_y = group.all_reduce(row_sums)
        nll = xp.log(sumexp) - z_y                                  # (N,)
        e /= sumexp[:, None]                                        # softmax, (N, V/tp)
        ctx.save_for_backward(e)
        ctx.rows, ctx.cols, ctx.mine = rows[mine], cols[mine], mine
        ctx.valid, ctx.count, ctx.shape = valid, count, logits.shape
        return (nll * valid).sum() / count

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved
        d = p.copy()                                                # softmax - onehot(y), local columns
        d[ctx.rows, ctx.cols] -= 1.0
        d *= (ctx.valid[:, None] * (g / ctx.count)).astype(d.dtype)
        return d.reshape(ctx.shape), None                           # (B, T, V/tp)


def vocab_parallel_cross_entropy(logits, targets, group, v0, ignore_index=-1):
    return VocabParallelCrossEntropy.apply(logits, targets, group=group, v0=v0, ignore_index=ignore_index)


def vocab_parallel_argmax(logits, group, v0):
    """Global argmax (B, T) of logits split along V (ties: the smallest id, as numpy's argmax)."""
    z, xp = logits, array_module(logits)                            # (B, T, V/tp)
    best = global_max(z.reshape(-1, z.shape[-1]), group).reshape(z.shape[:-1])   # (B, T)
    hit = z == best[..., None]                                      # (B, T, V/tp) attains the max
    vocab = group.size * z.shape[-1]
    first = xp.where(hit.any(axis=-1), hit.argmax(axis=-1) + v0, vocab)          # (B, T) global id
    # all-reduce (max) over tp of -id: the smallest id attaining the max, B*T elements
    return -group.all_reduce(-first.astype(xp.int64), op="max")


@dataclass
class VocabShard:
    """The logits' split over V (the GPT's `vocab` field): this tp rank holds ids [v0, v0 + V/tp)."""
    group: object
    v0: int

    def cross_entropy(self, logits, targets):
        return vocab_parallel_cross_entropy(logits, targets, self.group, self.v0)

    def argmax(self, logits):
        return vocab_parallel_argmax(logits, self.group, self.v0)
