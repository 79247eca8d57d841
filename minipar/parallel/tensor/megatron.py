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
(f), i.e. 8*b*s*h*(t-1)/t elements sent per rank (memory.tp_comm_elements). With
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

Dropout: every mask is drawn for the full serial row (nn.DropoutKey) and cut to
what this rank holds: attention masks by its heads (attn.head_slice), residual
and embedding masks along T under SP (key.seq), so the assembled masks are the
serial ones.
"""
from minipar import nn, ops
from minipar.backend import array_module
from minipar.autograd import Function
from minipar.layout import check_tensor_parallel
from minipar.nn import GPT, Block, Parameter, ShardSpec
from minipar.moe import MoE
from minipar.parallel.tensor.sequence import (GatherLinear, ReduceScatterSeq, SequenceParallelLayerNorm,
                                                add_bias, check_divisible, cut_key, positions)
from minipar.parallel.tensor.vocab import (VocabParallelEmbedding, vocab_parallel_argmax,
                                             vocab_parallel_cross_entropy, vocab_range)


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
class ColumnParallelLinear(nn.Module):
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


class RowParallelLinear(nn.Module):
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
    """Heads split over tp: c_attn column-parallel by whole heads, c_proj row-parallel.

        c_attn (C, H*3D)  [ h0: q k v | h1: q k v | h2: q k v | h3: q k v ]    H = 4, tp = 2
                          |-------- rank 0 -------|-------- rank 1 -------|
        c_proj (C, C)     rows of h0, h1 -> rank 0;  rows of h2, h3 -> rank 1
    """
    H, h, t = attn.n_head_total, attn.n_head_total // group.size, group.rank
    attn.c_attn = ColumnParallelLinear(shard_heads(attn.c_attn.weight, H, group),       # (C, 3C/tp)
                                       shard_heads(attn.c_attn.bias, H, group), group, sequence_parallel)
    attn.c_proj = RowParallelLinear(shard(attn.c_proj.weight, 0, group),                 # (C/tp, C)
                                    attn.c_proj.bias, group, sequence_parallel)
    attn.n_head, attn.head_slice = h, slice(t * h, (t + 1) * h)   # dropout masks are cut by head too
    return attn


def parallel_mlp(mlp, group, sequence_parallel):
    """fc column-parallel (C, 4C/tp), proj row-parallel (4C/tp, C)."""
    mlp.fc = ColumnParallelLinear(shard(mlp.fc.weight, 1, group), shard(mlp.fc.bias, 0, group),
                                  group, sequence_parallel)
    mlp.proj = RowParallelLinear(shard(mlp.proj.weight, 0, group), mlp.proj.bias, group, sequence_parallel)
    return mlp


class TensorParallelBlock(Block):
    """A Block whose attention and MLP are tensor-parallel; under SP, x is (B, T/tp, C) and
    the dropout key is cut to this rank's T slice before Block.forward draws residual masks."""

    def __init__(self, block, group, sequence_parallel):
        nn.Module.__init__(self)
        self.index, self.p, self.seq_len = block.index, block.p, block.seq_len
        self.ln_1 = layer_norm(block.ln_1, group, sequence_parallel)
        self.attn = parallel_attention(block.attn, group, sequence_parallel)
        self.ln_2 = layer_norm(block.ln_2, group, sequence_parallel)
        # an MoE layer stays whole on every tp rank (replicated; expert parallelism cuts it over dp)
        self.mlp = block.mlp if isinstance(block.mlp, MoE) else parallel_mlp(block.mlp, group, sequence_parallel)
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, x, key=None):
        if self.sequence_parallel:
            key = cut_key(key, x.shape[1], self.group.rank)
        return super().forward(x, key)


class TensorParallelGPT(GPT):
    """This rank's share of the GPT; the same interface (embed, blocks, head, criterion, ...).

    logits are (B, T, V/tp): the loss and the argmax are vocab-parallel, never gathered."""

    def __init__(self, serial, group, sequence_parallel):
        nn.Module.__init__(self)
        self.cfg, self.precision = serial.cfg, serial.precision
        self.group, self.sequence_parallel = group, sequence_parallel
        self.seq_chunk = serial.seq_chunk                  # context parallelism is applied after TP
        self.v0 = vocab_range(self.cfg.vocab_size, group)[0]
        self.wte = VocabParallelEmbedding(shard(serial.wte.weight, 0, group), self.v0)   # (V/tp, C)
        self.wpe = serial.wpe                                                         # replicated
        self.blocks = [TensorParallelBlock(b, group, sequence_parallel) for b in serial.blocks]
        self.ln_f = layer_norm(serial.ln_f, group, sequence_parallel)
        self.lm_head = None if serial.lm_head is None else ColumnParallelLinear(
            shard(serial.lm_head.weight, 1, group), None, group, sequence_parallel)    # (C, V/tp)
        for p in self.parameters():              # a replica's grad counts once in the global norm
            if p.spec.axis is None:
                p.norm_owner = group.rank == 0

    def embed(self, idx, key=None):
        idx, pos_ids = self.local_tokens(idx)              # (B, T), or (B, T/cp) under context parallelism
        B, T = idx.shape
        sp, group, p = self.sequence_parallel, self.group, self.cfg.dropout
        if sp:
            check_divisible(T, group.size)
        compute = self.precision.compute_dtype
        x = leave_tp(self.wte(idx, compute), group, sp)   # sum of partial lookups: (B, T, C) or (B, T/tp, C)
        pos = positions(self.wpe.weight, T, group, compute, pos_ids) if sp else self.wpe(pos_ids, compute)
        x = x + pos                                        # (B, T[/tp], C) + (T[/tp], C)
        if p and self.training:
            row = (T if key.seq is None else self.cfg.seq_len, x.shape[2])
            keep = key.keep(0, row, p)                      # (B, T, C): the serial mask rows
            cut = cut_key(key, x.shape[1], group.rank) if sp else key
            if cut.seq is not None:
                keep = keep[:, cut.seq]                     # (B, T/tp, C) under SP, T/cp under CP
            x = ops.dropout(x, keep, p)
        return x

    def head(self, x):
        x = self.ln_f(x)                                   # (B, T[/tp], C)
        if self.lm_head is not None:
            return self.lm_head(x)                         # column-parallel over V: (B, T, V/tp)
        # (B, T, V/tp) = x wte_t^T, entering the tp region as any column-parallel linear does
        return column_linear(x, self.wte.weight, None, self.group, self.sequence_parallel, transpose=True)

    def token_loss(self, logits, targets):
        return vocab_parallel_cross_entropy(logits, targets, self.group, self.v0)

    def token_argmax(self, logits):
        return vocab_parallel_argmax(logits.data, self.group, self.v0)


def shard_tensor_parallel(model, group, sequence_parallel=False):
    """The local tensor-parallel model of the full serial `model` over `group` (tp ranks).

    Split parameters become new Parameters holding a contiguous slice, with `name` the serial
    name and `spec` the slice; replicated ones (LayerNorms, wpe, row-parallel biases) are kept,
    with `norm_owner = False` on tp ranks > 0. Uneven splits are refused before any collective."""
    check_tensor_parallel(model.cfg, group.size, sequence_parallel)     # layout.py: heads, vocab, SP
    return TensorParallelGPT(model, group, sequence_parallel)
