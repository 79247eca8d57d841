"""Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models"): the parts of a layer that tensor parallelism leaves
replicated (LayerNorm, dropout, residual adds) run on a T/tp chunk of the sequence.

Without SP, the activation between two tensor-parallel regions is the full
(B, T, C) on every tp rank. With SP each rank keeps (B, T/tp, C), and Megatron's
f and g are replaced by their sequence counterparts:

    g  (all-reduce forward)      ->  g-bar: reduce-scatter along T forward,
                                           all-gather along T backward
    f  (all-reduce backward)     ->  f-bar: all-gather along T forward,
                                           reduce-scatter along T backward

      (B, T/tp, C) --LN, dropout--> f-bar --> (B, T, C) --column-parallel ...
      ... row-parallel --> (B, T, C) partial sums --> g-bar --> (B, T/tp, C)

An all-reduce IS a reduce-scatter followed by an all-gather, so the bytes moved
are the same as with f and g; what changes is that nothing outside the
attention/MLP interior is stored in full. The gathered input of the first
matmul is not kept either: `GatherLinear` saves this rank's T/tp chunk and
all-gathers it again in backward (Megatron's choice: 2 more all-gathers of
b·s·h per layer, and every activation a layer saves is then cut by tp).

Replicated weights (LayerNorm w and b, the positions table wpe, a row-parallel
bias) are now applied by each rank to ITS chunk of T only, so each rank's dW is a
partial sum over its chunk. The true gradient is the sum over tp: that is f
applied to the weight (identity forward, all-reduce backward). `SumWeightGrads`
does exactly that inside autograd, fused with the op that uses the weight (ops
read weights from their leaf Parameter in backward, so the weight must stay a
direct input of that op). Because every micro-batch's backward sums its own
contribution before it is accumulated into .grad, gradient accumulation stays
exact.

Our arrays are batch-first (B, T, C) while Group's collectives cut axis 0, so T is
moved to the front around each collective (Megatron stores activations
sequence-first (T, B, C) for this reason).
"""
from minipar import ops
from minipar.autograd import Function
from minipar.backend import array_module
from minipar.layers import Module


def seq_slice(t_local, rank):
    """This rank's slice of the serial T axis when every rank holds t_local positions."""
    return slice(rank * t_local, (rank + 1) * t_local)


def check_divisible(T, tp):
    """Sequence parallelism cuts T into tp equal chunks: refuse anything else."""
    if T % tp:
        raise ValueError(f"sequence parallelism splits the sequence over tp={tp} ranks: "
                         f"T={T} is not divisible by {tp}")


def _gather_seq(x, group):
    """(B, T/tp, C) on every rank -> (B, T, C), chunks in rank order."""
    front = x.swapaxes(0, 1)                                   # (T/tp, B, C)
    # all-gather over tp: every rank's (T/tp, B, C) chunk -> (T, B, C), B*T*C elements out
    return group.all_gather(front).swapaxes(0, 1)              # (B, T, C)


def _reduce_scatter_seq(x, group):
    """(B, T, C) partial sums on every rank -> this rank's (B, T/tp, C) chunk of the sum."""
    front = x.swapaxes(0, 1)                                   # (T, B, C)
    # reduce-scatter (sum) over tp: B*T*C elements in, this rank keeps its (T/tp, B, C) block
    return group.reduce_scatter(front).swapaxes(0, 1)          # (B, T/tp, C)


class GatherSeq(Function):
    """f-bar: all-gather along T forward, reduce-scatter along T backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)                           # (B, T/tp, C) -> (B, T, C)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group)            # (B, T, C) -> (B, T/tp, C)


class ReduceScatterSeq(Function):
    """g-bar: reduce-scatter along T forward, all-gather along T backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)                   # (B, T, C) -> (B, T/tp, C)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group)                    # (B, T/tp, C) -> (B, T, C)


class GatherLinear(Function):
    """f-bar fused with the column-parallel matmul that follows it, as Megatron runs it:

        forward   x_full = all-gather_T(x)        (B, T/tp, C) -> (B, T, C)
                  y = x_full A_t + b_t            keep only x, this rank's chunk
        backward  x_full = all-gather_T(x)        again: the "re-gather"
                  dx = reduce-scatter_T(dy A_t^T),  dA_t = x_full^T dy,  db_t = sum dy

    Saving x instead of x_full is what makes the LayerNorm output, the input of
    c_attn and fc, cost s·b·h/t instead of s·b·h per rank (Korthikanti et al. 2022,
    §4.2.2); it costs one more all-gather of b·s·h per use in backward. With a
    wgrad queue (ZB-H1) the re-gathered x_full waits with the deferred dA_t."""

    @staticmethod
    def forward(ctx, x, w, b=None, group=None, transpose=False):
        full = _gather_seq(x, group)                           # (B, T, C_in)
        ctx.group, ctx.transpose, ctx.x_shape = group, transpose, full.shape
        ctx.save_for_backward(x)                               # (B, T/tp, C_in): all that is kept
        ctx.keep_weight(1, w)
        y = ops.affine(full.reshape(-1, full.shape[-1]), w, b, transpose)   # (B*T, C_out/tp)
        return y.reshape(*full.shape[:-1], -1)                 # (B, T, C_out/tp)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved
        full = _gather_seq(x, ctx.group)                       # re-gather: (B, T, C_in)
        ctx.saved = (full.reshape(-1, full.shape[-1]),)        # (B*T, C_in), what Linear.backward reads
        dx, dw, db = ops.Linear.backward(ctx, grad)            # dx (B, T, C_in): partial over tp
        return _reduce_scatter_seq(dx, ctx.group), dw, db      # (B, T/tp, C_in)


class SumWeightGrads(Function):
    """`op` (an ops Function) whose weight inputs get gradients summed over tp:
    f applied to the weights, fused with their use.

        y = op(x, w, ...)             forward: unchanged (identity on the weights)
        dw = sum over tp of dw_rank   backward: one all-reduce of all weights' grads

    `weights` lists the positions of the weight inputs."""

    @staticmethod
    def forward(ctx, *arrays, op, group, weights, **kwargs):
        ctx.op, ctx.group, ctx.weights = op, group, weights
        return op.forward(ctx, *arrays, **kwargs)              # op saves what it needs on our ctx

    @staticmethod
    def backward(ctx, grad):
        grads = list(ctx.op.backward(ctx, grad))
        parts = [grads[i] for i in ctx.weights]
        flat = array_module(grad).concatenate([g.reshape(-1) for g in parts])   # (sum of weight sizes,)
        # all-reduce (sum) over tp of the replicated weights' partial grads: their total numel
        ctx.group.all_reduce_(flat)
        start = 0
        for i, g in zip(ctx.weights, parts):
            grads[i] = flat[start:start + g.size].reshape(g.shape)
            start += g.size
        return tuple(grads)


class SequenceParallelLayerNorm(Module):
    """LayerNorm on this rank's (B, T/tp, C) chunk; its w and b gradients are summed over tp.

        weight (C,), bias (C,): the serial LayerNorm's, replicated   [ w ] [ w ] ... [ w ]
        input:  rank t holds rows T*t/tp .. T*(t+1)/tp of the sequence
    """

    def __init__(self, serial, group):
        super().__init__()
        self.weight, self.bias, self.group = serial.weight, serial.bias, group

    def forward(self, x):
        return SumWeightGrads.apply(x, self.weight, self.bias, op=ops.LayerNorm,
                                    group=self.group, weights=(1, 2))   # (B, T/tp, C)


class SequenceParallelPositions(Module):
    """The position table wpe (replicated, the serial Embedding's weight) looked up for this
    rank's T/tp chunk of the tokens only; its gradient is summed over tp."""

    def __init__(self, serial, group):
        super().__init__()
        self.weight, self.group = serial.weight, group

    def forward(self, ids, dtype=None):
        """ids (T,): the serial positions of the tokens (0..T-1, or context parallelism's) ->
        the wpe rows of this rank's chunk, (T/tp, C)."""
        rows = seq_slice(ids.shape[0] // self.group.size, self.group.rank)
        return SumWeightGrads.apply(ids[rows], self.weight, op=ops.Embedding,
                                    group=self.group, weights=(1,), dtype=dtype)   # (T/tp, C)


def add_bias(y, bias, group):
    """y + b for a replicated bias after the reduce-scatter: b's grad is summed over tp."""
    return SumWeightGrads.apply(y, bias, op=ops.Add, group=group, weights=(1,))   # (B, T/tp, C)
