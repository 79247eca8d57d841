"""The cp layer: what a context-parallel rank holds, and the attention that replaces the core.

Context parallelism (Megatron-LM `--context-parallel-size`; Liu et al. 2023) splits the
tokens of the SAME samples over the cp ranks for the whole layer. Everything in a
transformer but attention works token by token, so the serial modules run unchanged
on a rank's T/cp tokens; only three things need to know which tokens these are:

* the input: `ContextShard.take` keeps this rank's columns of the (B, T) ids, and
  the position embedding looks up their serial positions (`positions_on`);
* dropout: every mask is drawn for the full serial row and cut at these positions
  (the stream Dropouts' `rows`; attention masks by query rows), as TP/SP do;
* the loss: the serial loss is the mean over ALL scored tokens of the micro-batch,
  sum_all / n_all. A rank sees sum_mine, so it reports cp * sum_mine / n_all
  (`ContextShard.loss`); averaging gradients over dp x cp (Megatron folds cp into the
  data-parallel group) then gives exactly the serial gradient, and the logged loss
  (averaged over dp x cp) the serial loss.

The serial GPT carries one declared field for this, `seq_chunk` (None: all of T),
and `ContextParallelAttention` replaces each block's attention module, reusing its
(serial or tensor-parallel) c_attn and c_proj: the qkv projection and the output
projection are token-wise, only the core in between is ring attention or Ulysses.

    x (B, T/cp, C) -> c_attn -> qkv (B, T/cp, 3C/tp) -> ring | Ulysses -> (B, T/cp, C/tp) -> c_proj
"""
from dataclasses import replace

import numpy as np

from minipar import ops
from minipar.layers import Module
from minipar.backend import array_module, to_device
from minipar.layout import check_cp_algorithm, check_heads
from minipar.parallel.context.ring_attention import AttentionWork, ring_attention
from minipar.parallel.context.split import ContextSplit
from minipar.parallel.context.ulysses import UlyssesIndex, heads_to_seq, seq_to_heads


class ContextShard:
    """This rank's chunk(s) of every sequence: the model's `seq_chunk` field.

    split: the ContextSplit (which positions); group: the cp Group; work: the attention
    FLOPs ledger its layers record into; positions: host (T/cp,) serial positions."""

    def __init__(self, split, group, xp, count=None):
        self.split, self.group, self.cp, self.xp = split, group, group.size, xp
        self.positions = split.positions()                           # (T/cp,) host, for mask rows
        self.device_positions = to_device(self.positions, xp, count)  # the same, for indexing data
        self.gather_order = to_device(split.all_positions(), xp, count)
        self.work = AttentionWork()

    def take(self, ids):
        """This rank's columns of (B, T) ids or targets: (B, T/cp)."""
        if ids.shape[1] != self.split.seq_len:
            raise ValueError(f"context parallelism needs whole sequences of {self.split.seq_len} "
                             f"tokens, got {ids.shape[1]}")
        return ids[:, self.device_positions]                          # (B, T/cp)

    def loss(self, token_loss, logits, targets):
        """cp * sum of this rank's token losses / the micro-batch's scored-token count.
        token_loss(logits, local targets) is the mean over this rank's scored tokens."""
        local = self.take(targets)                                    # (B, T/cp)
        n_mine, n_all = max(int((local != -1).sum()), 1), max(int((targets != -1).sum()), 1)
        return token_loss(logits, local) * (self.cp * n_mine / n_all)

    def gather(self, ids):
        """(B, T/cp) per-token ids on each cp rank -> (B, T) in serial order on every one."""
        front = array_module(ids).ascontiguousarray(ids.T)           # (T/cp, B)
        # all-gather over cp: every rank's (T/cp, B) predicted ids -> (T, B), B*T elements out
        every = self.group.all_gather(front)                          # (T, B), rank after rank
        out = array_module(ids).empty((ids.shape[0], self.split.seq_len), dtype=ids.dtype)
        out[:, self.gather_order] = every.T                           # (B, T) serial order
        return out


class ContextParallelAttention(Module):
    """A block's attention with its core replaced by ring attention or Ulysses.

    Keeps the attention module's c_attn / c_proj (tensor-parallel or not), its heads
    (n_head local of n_head_total serial), its dropout site and its mask of those heads
    (`heads_keep`: the serial module's (B, H, T, T), a tensor-parallel one's H/tp of them)."""

    def __init__(self, attn, shard, algorithm, n_head_total):
        super().__init__()
        check_cp_algorithm(algorithm)                                 # layout.py: ring | ulysses
        self.c_attn, self.c_proj = attn.c_attn, attn.c_proj
        self.n_head, self.n_head_total, self.heads_keep = attn.n_head, n_head_total, attn.keep
        self.p, self.site, self.shard, self.algorithm = attn.p, attn.site, shard, algorithm
        self.index = None
        if algorithm == "ulysses":
            check_heads(self.n_head_total, self.n_head_total // self.n_head, shard.cp)
            self.index = UlyssesIndex(shard.split, shard.xp)

    def forward(self, x, key=None):
        qkv = self.c_attn(x)                                          # (B, T/cp, 3C/tp)
        shard, drop = self.shard, self.p and self.training
        T = shard.split.seq_len
        full = self.heads_keep(key, T) if drop else None              # (B, H/tp, T, T)
        if self.algorithm == "ring":                                  # mask rows of my queries: (B, H/tp, T/cp, T)
            keep = None if full is None else full[:, :, shard.positions]
            y = ring_attention(qkv, self.n_head, shard.split, shard.group, keep, self.p, shard.work)
        else:
            g, c = self.n_head // shard.cp, shard.group.rank          # my head group of this tp rank's heads
            keep = None if full is None else full[:, c * g:(c + 1) * g]   # (B, H/(tp cp), T, T)
            heads = seq_to_heads(qkv, shard.group, self.index)        # (B, T, 3C/(tp cp))
            y = heads_to_seq(ops.causal_attention(heads, g, keep, self.p), shard.group, self.index)
            B, D = qkv.shape[0], qkv.shape[2] // (3 * self.n_head)
            shard.work.record("forward", "full", 4 * B * g * T * T * D)   # serial core: the whole T x T
        return self.c_proj(y)                                         # (B, T/cp, C)


def shard_context_parallel(model, group, algorithm="ring", split="zigzag", xp=None, count=None):
    """Narrow `model` (serial or tensor-parallel GPT) in place to cp rank group.rank's tokens;
    xp: the device module the engine will move the parameters to (positions go there too)."""
    shard = ContextShard(ContextSplit(model.cfg.seq_len, group.size, group.rank, split), group,
                         xp or np, count)
    model.seq_chunk = shard
    for block in model.blocks:
        block.attn = ContextParallelAttention(block.attn, shard, algorithm, model.cfg.n_head)
    for drop in model.stream_dropouts():        # residual / embedding masks: cut at my positions
        drop.rows = replace(drop.rows, positions=shard.positions)
    return model
