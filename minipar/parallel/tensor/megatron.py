"""Tensor parallelism, Megatron-style (Shoeybi et al. 2019), with sequence parallelism.

A transformer layer is two MLP-like pairs of matmuls: (c_attn, c_proj) around
attention and (fc, proj) around GELU. Split the first matmul of a pair by output
columns and the second by input rows, and the nonlinearity in between needs no
communication. Each pair is wrapped by Megatron's conjugate operators:

    f: identity forward, all-reduce backward   (entering the pair: x is replicated)
    g: all-reduce forward, identity backward   (leaving it: the outputs are partial sums)

          f          column-parallel             row-parallel            g
  x ----> x ----> x A_t ----> GELU ----> GELU(x A_t) B_t ----> sum over t ----> z
(B,T,C)        (B,T,4C/tp)                  (B,T,C) partial                   (B,T,C)

So per layer and micro-batch: 2 all-reduces of b*s*h forward (g) and 2 backward
(f), i.e. 8*b*s*h*(t-1)/t elements sent per rank (formulas.tp_comm_elements). With
sequence parallelism (sequence.py) f and g become all-gather /
reduce-scatter along T with the same volume, plus Megatron's re-gather of the
c_attn and fc inputs in backward (GatherLinear keeps only their T/tp chunk):
6 all-gathers + 4 reduce-scatters, 10*b*s*h*(t-1)/t elements.

Per micro-batch outside the layers (the tests count these separately):
                   no SP                       SP
    embedding fwd  all-reduce bsh (g)          reduce-scatter bsh
              bwd  -                           all-gather bsh; all-reduce seq_len*h (wpe grad)
    head      fwd  -                           all-gather bsh
              bwd  all-reduce bsh (f)          all-gather bsh (re-gather), reduce-scatter bsh;
                                               all-reduce 2h (ln_f grads)
    loss      fwd  all-reduce b*s (row max), all-reduce 2*b*s (sum exp, target logit)
    layer     bwd  -                           all-gather bsh twice (re-gathers of the c_attn and
                                               fc inputs); all-reduce 2h twice (ln_1, ln_2), h
                                               twice (biases)

Head split: the serial c_attn weight (C, H*3*D) is packed head-major, so whole
heads are one contiguous block of columns; rank t runs heads H*t/tp .. H*(t+1)/tp.

Composition, not subclassing: `shard_tensor_parallel` narrows the serial GPT in place.
Each block's attention becomes a TensorParallelAttention holding the serial weights'
slices; the MLP keeps its module with its two Linears swapped for column- and
row-parallel ones; wte becomes a VocabParallelEmbedding (its lookup: vocab.py), and
under SP the LayerNorms and wpe become their sequence-parallel modules (sequence.py).
The GPT's `vocab` field makes its loss and argmax vocab-parallel.

Dropout: every mask is drawn for the full serial row (minipar/dropout.py) and cut to
what this rank holds: attention masks by its heads (TensorParallelAttention.head_slice),
residual and embedding masks along T under SP (each stream Dropout's `rows`), so the
assembled masks are the serial ones. A replicated parameter's gradient is counted in
the global norm by tp rank 0 only (`spec.norm_owner`, mark_replicas).
"""
from dataclasses import replace

from minipar import ops
from minipar.autograd import Function
from minipar.layers import Module, Parameter, ShardSpec
from minipar.layout import check_tensor_parallel
from minipar.parallel.tensor.sequence import (GatherLinear, ReduceScatterSeq, SequenceParallelLayerNorm,
                                                SequenceParallelPositions, add_bias, check_divisible)
from minipar.parallel.tensor.vocab import PartialLookup, VocabShard, vocab_range


# ----------------------------------------------------------------------------- f and g
class CopyToTP(Function):
    """f: identity forward, all-reduce backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        # all-reduce (sum) over tp of dL/dx: each rank's term through its columns, B*T*C elements
        return ctx.group.all_reduce(grad)


class ReduceFromTP(Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        # all-reduce (sum) over tp of the partial outputs, B*T*C elements
        return group.all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def column_linear(x, w, b, group, sequence_parallel, transpose=False):
    """x A_t + b_t entering a tensor-parallel region. Under SP the all-gather is fused with
    the matmul, so only x's T/tp chunk is kept for backward (GatherLinear)."""
    if sequence_parallel:
        return GatherLinear.apply(x, w, b, group=group, transpose=transpose)   # (B, T, C_out/tp)
    return ops.linear(CopyToTP.apply(x, group=group), w, b, transpose=transpose)   # (B, T, C_out/tp)


def leave_tp(x, group, sequence_parallel):
    """Out of it, summing partial outputs: g, or under SP reduce-scatter along T."""
    return ReduceScatterSeq.apply(x, group=group) if sequence_parallel else ReduceFromTP.apply(x, group=group)


# ----------------------------------------------------------------------------- layers
class ColumnParallelLinear(Module):
    """y_t = f(x) A_t + b_t: output features split over tp, A_t = A[:, t*C_out/tp : ...].

        A (C_in, C_out)                      y (B, T, C_out)
        +------+------+------+------+        +------+------+------+------+
        |  A_0 |  A_1 |  A_2 |  A_3 |   ->   |  y_0 |  y_1 |  y_2 |  y_3 |   no communication:
        +------+------+------+------+        +------+------+------+------+   y stays split
         rank 0 rank 1 rank 2 rank 3
    """

    def __init__(self, weight, bias, group, sequence_parallel):
        super().__init__()
        self.weight, self.bias = weight, bias                  # (C_in, C_out/tp), (C_out/tp,)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        # (B, T[/tp], C_in) -> (B, T, C_out/tp): f, or under SP all-gather along T
        return column_linear(x, self.weight, self.bias, self.group, self.sequence_parallel)


class RowParallelLinear(Module):
    """y = g(sum_t x_t B_t) + b: input features split over tp, B_t = B[t*C_in/tp : ..., :].

        B (C_in, C_out)         x (B, T, C_in) split      y = sum_t x_t B_t  (g: all-reduce)
        +-----------------+     +-----+-----+-----+-----+
        | B_0   rank 0    |     | x_0 | x_1 | x_2 | x_3 |   the bias (C_out,) is replicated
        | B_1   rank 1    |     +-----+-----+-----+-----+   and added ONCE, after the sum
        | B_2   rank 2    |
        | B_3   rank 3    |
        +-----------------+
    """

    def __init__(self, weight, bias, group, sequence_parallel):
        super().__init__()
        self.weight, self.bias = weight, bias                  # (C_in/tp, C_out), (C_out,) replicated
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x):
        y = ops.linear(x, self.weight)                         # (B, T, C_out), partial sum over tp
        y = leave_tp(y, self.group, self.sequence_parallel)    # (B, T, C_out), or (B, T/tp, C_out) under SP
        if self.bias is None:
            return y
        return add_bias(y, self.bias, self.group) if self.sequence_parallel else y + self.bias


class TensorParallelAttention(Module):
    """This rank's heads of a serial CausalSelfAttention: c_attn column-parallel by whole
    heads, c_proj row-parallel; the attention core runs on H/tp heads with no communication.

        c_attn (C, H*3D)  [ h0: q k v | h1: q k v | h2: q k v | h3: q k v ]    H = 4, tp = 2
                          |-------- rank 0 -------|-------- rank 1 -------|
        c_proj (C, C)     rows of h0, h1 -> rank 0;  rows of h2, h3 -> rank 1

    Dropout masks are the serial (H, T, T) ones cut to this rank's heads, `head_slice`."""

    def __init__(self, attn, group, sequence_parallel):
        super().__init__()
        H, t = attn.n_head, group.rank
        h = H // group.size
        self.c_attn = ColumnParallelLinear(shard_heads(attn.c_attn.weight, H, group),     # (C, 3C/tp)
                                           shard_heads(attn.c_attn.bias, H, group), group, sequence_parallel)
        self.c_proj = RowParallelLinear(shard(attn.c_proj.weight, 0, group),               # (C/tp, C)
                                        attn.c_proj.bias, group, sequence_parallel)
        self.n_head, self.n_head_total, self.head_slice = h, H, slice(t * h, (t + 1) * h)
        self.p, self.site = attn.p, attn.site

    def forward(self, x, key=None):
        qkv = self.c_attn(x)                                   # (B, T, 3C/tp)
        keep = self.keep(key, qkv.shape[1]) if self.p and self.training else None
        y = ops.causal_attention(qkv, self.n_head, keep, self.p)   # (B, T, C/tp)
        return self.c_proj(y)                                  # (B, T, C), or (B, T/tp, C) under SP

    def keep(self, key, T):
        """The serial mask rows (B, H, T, T) cut to this rank's heads: (B, H/tp, T, T)."""
        return key.keep(self.site, (self.n_head_total, T, T), self.p)[:, self.head_slice]


class VocabParallelEmbedding(Module):
    """wte split along V: this rank holds rows [v0, v1), weight (V/tp, C).

        serial wte (V, C)          rank t
        [ rows 0   .. V/tp   ]  -> rank 0
        [ rows V/tp.. 2V/tp  ]  -> rank 1      ids outside [v0, v1) -> 0;
        [       ...          ]                 sum over tp = serial lookup
    """

    def __init__(self, weight, v0, group, sequence_parallel):
        super().__init__()
        self.weight, self.v0 = weight, v0
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, ids, dtype=None):
        """ids (B, T) -> the serial lookup (B, T, C), or under SP this rank's (B, T/tp, C) of it."""
        if self.sequence_parallel:
            check_divisible(ids.shape[1], self.group.size)   # refused before any collective
        part = PartialLookup.apply(ids, self.weight, v0=self.v0, dtype=dtype)   # (B, T, C) partial
        return leave_tp(part, self.group, self.sequence_parallel)                # summed over tp

    def attend(self, x):
        """(B, T, V/tp) = x wte_t^T, entering the tp region as any column-parallel linear does."""
        return column_linear(x, self.weight, None, self.group, self.sequence_parallel, transpose=True)


# ----------------------------------------------------------------------------- slicing the serial model
def shard(p, axis, group):
    """This rank's contiguous 1/tp slice of serial Parameter p along `axis`, as a new Parameter."""
    n = p.data.shape[axis] // group.size
    spec = ShardSpec(p.name, p.data.shape, axis, group.rank * n, (group.rank + 1) * n)
    local = Parameter(spec.take(p.data).copy(), name=p.name)
    local.spec = spec
    return local


def split_heads(w, n_head, group):
    """This rank's whole heads of a head-major packed array (..., H*3*D) -> (..., H/tp*3*D)."""
    heads = w.reshape(*w.shape[:-1], n_head, -1)               # (..., H, 3D)
    h = n_head // group.size
    mine = heads[..., group.rank * h:(group.rank + 1) * h, :]  # (..., H/tp, 3D)
    return mine.reshape(*w.shape[:-1], -1).copy()              # (..., H/tp * 3D)


def shard_heads(p, n_head, group):
    """c_attn's weight or bias cut by whole heads. Head-major packing makes that the
    contiguous block of columns that `spec` (last axis) describes."""
    local = shard(p, p.data.ndim - 1, group)
    local.data = split_heads(p.data, n_head, group)
    return local


def layer_norm(ln, group, sequence_parallel):
    """Replicated LayerNorm: the serial module, or under SP one that sums its grads over tp."""
    return SequenceParallelLayerNorm(ln, group) if sequence_parallel else ln


def parallel_attention(attn, group, sequence_parallel):
    """The tensor-parallel module that replaces a block's serial attention."""
    return TensorParallelAttention(attn, group, sequence_parallel)


def parallel_mlp(mlp, group, sequence_parallel):
    """The serial MLP with fc column-parallel (C, 4C/tp) and proj row-parallel (4C/tp, C)."""
    mlp.fc = ColumnParallelLinear(shard(mlp.fc.weight, 1, group), shard(mlp.fc.bias, 0, group),
                                  group, sequence_parallel)
    mlp.proj = RowParallelLinear(shard(mlp.proj.weight, 0, group), mlp.proj.bias, group, sequence_parallel)
    return mlp


def mark_replicas(model, group):
    """A replicated parameter (LayerNorms, wpe, row-parallel biases, a whole MoE layer) is held
    by every tp rank: its gradient counts once in the global norm, on tp rank 0."""
    for p in model.parameters():
        if p.spec.axis is None:
            p.spec.norm_owner = group.rank == 0


def shard_tensor_parallel(model, group, sequence_parallel=False):
    """Narrow the serial GPT `model` in place to this rank's tensor-parallel share over `group`
    (tp ranks); the same interface (embed, blocks, head, criterion, ...), and logits
    (B, T, V/tp) whose loss and argmax are vocab-parallel, never gathered.

    Split parameters become new Parameters holding a contiguous slice, with `name` the serial
    name and `spec` the slice; replicated ones are kept, with `spec.norm_owner = False` on tp
    ranks > 0. Uneven splits are refused before any collective."""
    cfg, tp, sp = model.cfg, group.size, sequence_parallel
    check_tensor_parallel(cfg, tp, sp)     # layout.py: whole heads, whole vocabulary rows, SP's T
    v0 = vocab_range(cfg.vocab_size, group)[0]
    model.wte = VocabParallelEmbedding(shard(model.wte.weight, 0, group), v0, group, sp)   # (V/tp, C)
    if sp:
        model.wpe = SequenceParallelPositions(model.wpe, group)   # this rank's T/tp rows of wpe
    for block in model.blocks:
        block.ln_1, block.ln_2 = layer_norm(block.ln_1, group, sp), layer_norm(block.ln_2, group, sp)
        block.attn = parallel_attention(block.attn, group, sp)
        if not cfg.is_moe(block.index):  # an MoE layer stays whole on every tp rank (ep cuts it over dp)
            block.mlp = parallel_mlp(block.mlp, group, sp)
    model.ln_f = layer_norm(model.ln_f, group, sp)
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear(shard(model.lm_head.weight, 1, group), None, group, sp)   # (C, V/tp)
    model.vocab = VocabShard(group, v0)
    if sp:                               # the residual stream holds chunk `rank` of tp along T
        for drop in model.stream_dropouts():
            drop.rows = replace(drop.rows, chunk=group.rank, chunks=tp)
    mark_replicas(model, group)
    return model
