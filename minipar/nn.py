"""The GPT (Radford et al. 2019), nanoGPT-shaped: its config, attention, MLP, Block and model.

    idx (B, T) -> wte[idx] + wpe[0:T] -> dropout -> n_layer x Block -> ln_f -> logits (B, T, V)
    Block:  x = x + drop(attn(ln_1(x)));  x = x + drop(mlp(ln_2(x)))

This is the serial model, the oracle every parallel run is compared against. It knows
nothing of parallelism: a strategy narrows it in place by replacing its parts with
parallel modules that take the serial weights (tensor parallelism: attention, MLP,
embeddings; context parallelism: attention; expert parallelism: the MoE layers),
by narrowing a Parameter's ShardSpec, and by setting two declared fields of the GPT,
`vocab` (logits split over V) and `seq_chunk` (this rank's tokens), and the `rows` of
its Dropouts (minipar/dropout.py).
"""
from dataclasses import dataclass

import numpy as np

from minipar import ops
from minipar.backend import array_module
from minipar.backend import precision as get_precision
from minipar.dropout import Dropout, DropoutKey
from minipar.layers import Embedding, LayerNorm, Linear, Module, ShardSpec
from minipar.moe import MoE, WithAux, aux_of


@dataclass
class GPTConfig:
    vocab_size: int = 16         # V: number of token ids
    seq_len: int = 16            # T: context length (size of the position table)
    n_layer: int = 2             # L: transformer blocks
    n_head: int = 4              # H: attention heads (C must divide by H)
    d_model: int = 64            # C: residual stream width
    tied_embeddings: bool = True  # lm_head reuses wte (logits = x @ wte^T)
    dropout: float = 0.0         # p for embedding, residual and attention dropout
    precision: str = "fp64"      # fp64 | fp32 | mixed (see backend.Precision)
    # mixture of experts (minipar/moe.py); experts = 0 keeps every MLP dense
    experts: int = 0             # E: expert MLPs per MoE layer
    top_k: int = 2               # k: experts each token is routed to (k <= E)
    moe_every: int = 1           # every n-th Block's MLP is an MoE (blocks n-1, 2n-1, ...)
    aux_loss_coef: float = 0.01  # alpha of the Switch/GShard load-balancing loss
    capacity_factor: float = None  # None: dropless; else C = ceil(cf * N * k / E) slots per expert

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        get_precision(self.precision)
        if self.experts:
            if not 1 <= self.top_k <= self.experts or self.moe_every < 1:
                raise ValueError(f"MoE needs 1 <= top_k <= experts and moe_every >= 1, got top_k="
                                 f"{self.top_k}, experts={self.experts}, moe_every={self.moe_every}")
            if self.aux_loss_coef < 0 or (self.capacity_factor is not None and self.capacity_factor <= 0):
                raise ValueError("MoE needs aux_loss_coef >= 0 and capacity_factor > 0 (or None)")

    def is_moe(self, index):
        """Is Block `index`'s MLP a mixture of experts?"""
        return self.experts > 0 and index % self.moe_every == self.moe_every - 1


class CausalSelfAttention(Module):
    """Multi-head causal self-attention; c_attn packs q, k, v head-major: (C, H*3*D).

    Attention dropout (site `site`) drops entries of the (H, T, T) probabilities."""

    def __init__(self, cfg, rng, dtype, site):
        super().__init__()
        c = cfg.d_model
        self.n_head, self.p, self.site = cfg.n_head, cfg.dropout, site
        self.c_attn = Linear(c, 3 * c, rng, dtype)
        self.c_proj = Linear(c, c, rng, dtype, std=0.02 / np.sqrt(2 * cfg.n_layer))

    def forward(self, x, key=None):
        qkv = self.c_attn(x)                           # (B, T, 3C)
        keep = self.keep(key, qkv.shape[1]) if self.p and self.training else None
        y = ops.causal_attention(qkv, self.n_head, keep, self.p)   # (B, T, C)
        return self.c_proj(y)                          # (B, T, C)

    def keep(self, key, T):
        """The attention keep-mask of these samples' heads: (B, H, T, T)."""
        return key.keep(self.site, (self.n_head, T, T), self.p)


class MLP(Module):
    def __init__(self, cfg, rng, dtype):
        super().__init__()
        c = cfg.d_model
        self.fc = Linear(c, 4 * c, rng, dtype)
        self.proj = Linear(4 * c, c, rng, dtype, std=0.02 / np.sqrt(2 * cfg.n_layer))

    def forward(self, x):
        return self.proj(ops.gelu(self.fc(x)))        # (B, T, 4C) -> (B, T, C)


class Block(Module):
    """Pre-LN transformer block; its MLP is an MoE where the config says so (cfg.is_moe)."""

    def __init__(self, cfg, rng, dtype, index):
        super().__init__()
        self.index = index
        self.ln_1 = LayerNorm(cfg.d_model, dtype)
        self.attn = CausalSelfAttention(cfg, rng, dtype, site=3 * index + 3)
        self.drop_1 = Dropout(cfg.dropout, 3 * index + 1, cfg.seq_len)
        self.ln_2 = LayerNorm(cfg.d_model, dtype)
        self.mlp = MoE.from_config(cfg, rng, dtype) if cfg.is_moe(index) else MLP(cfg, rng, dtype)
        self.drop_2 = Dropout(cfg.dropout, 3 * index + 2, cfg.seq_len)

    def forward(self, x, key=None):
        x = x + self.drop_1(self.attn(self.ln_1(x), key), key)
        return x + self.drop_2(self.mlp(self.ln_2(x)), key)


class GPT(Module):
    """The serial model; the parallel strategies narrow it in place (see the module docstring)."""

    def __init__(self, cfg, seed=0):
        super().__init__()
        self.cfg = cfg
        self.precision = get_precision(cfg.precision)
        rng, dtype = np.random.default_rng(seed), self.precision.param_dtype
        self.wte = Embedding(cfg.vocab_size, cfg.d_model, rng, dtype)
        self.wpe = Embedding(cfg.seq_len, cfg.d_model, rng, dtype)
        self.drop = Dropout(cfg.dropout, 0, cfg.seq_len)
        self.blocks = [Block(cfg, rng, dtype, i) for i in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.d_model, dtype)
        self.lm_head = None if cfg.tied_embeddings else Linear(cfg.d_model, cfg.vocab_size, rng, dtype, bias=False)
        self.vocab = None        # tensor parallelism: the logits' split over V (a VocabShard); None = all of V
        self.seq_chunk = None    # context parallelism: this rank's chunk(s) of T (a ContextShard); None = all
        for name, p in self.named_parameters():
            p.name, p.spec = name, ShardSpec(name, p.data.shape)

    def stream_dropouts(self):
        """The Dropouts on the residual stream (B, T, C): the embedding's, then two per block.
        Sequence and context parallelism declare the rows they hold on these."""
        return [self.drop] + [d for block in self.blocks for d in (block.drop_1, block.drop_2)]

    def local_tokens(self, idx):
        """(ids, positions) of the tokens this model runs: all of idx (B, T) and 0..T-1, or under
        context parallelism this rank's columns (B, T/cp) and their serial positions."""
        if self.seq_chunk is None:
            return idx, array_module(self.wpe.weight.data).arange(idx.shape[1])
        return self.seq_chunk.take(idx), self.seq_chunk.device_positions

    def dropout_key(self, seed, step, samples):
        """The DropoutKey of these samples (global indices) at this step."""
        return DropoutKey(seed, step, samples)

    # The three pieces a pipeline stage is made of: embed (first stage), blocks, head (last stage).
    def embed(self, idx, key=None):
        idx, positions = self.local_tokens(idx)                          # (B, T[/cp]), (T[/cp],)
        compute = self.precision.compute_dtype
        x = self.wte(idx, compute) + self.wpe(positions, compute)       # (B, T, C) + (T, C)
        return self.drop(x, key)

    def head(self, x):
        x = self.ln_f(x)                                          # (B, T, C)
        if self.lm_head is None:
            return self.wte.attend(x)                             # (B, T, V) = x wte^T
        return self.lm_head(x)

    def forward(self, idx, key=None):
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds seq_len={self.cfg.seq_len}")
        x = self.embed(idx, key)
        for block in self.blocks:
            x = block(x, key)
        return self.head(x)

    def criterion(self, logits, targets):
        """Mean cross-entropy over the targets that are not ignored (-1); targets (B, T)."""
        if self.seq_chunk is None:
            return self.token_loss(logits, targets)
        return self.seq_chunk.loss(self.token_loss, logits, targets)   # logits hold T/cp tokens

    def token_loss(self, logits, targets):
        """Mean cross-entropy over the scored targets of these logits (vocab-parallel under TP)."""
        if self.vocab is None:
            return ops.cross_entropy(logits, targets)
        return self.vocab.cross_entropy(logits, targets)

    def predict(self, logits):
        """Greedy next-token ids (B, T) from logits (under cp gathered from every cp rank)."""
        ids = self.token_argmax(logits)
        return ids if self.seq_chunk is None else self.seq_chunk.gather(ids)

    def token_argmax(self, logits):
        """Greedy ids of these logits' tokens (vocab-parallel under TP)."""
        return logits.data.argmax(axis=-1) if self.vocab is None else self.vocab.argmax(logits.data)

    def loss(self, idx, targets, key=None):
        if key is None and self.cfg.dropout and self.training:
            raise ValueError("dropout > 0 in training needs a DropoutKey (seed, step, sample indices)")
        loss = self.criterion(self(idx, key), targets)
        if self.cfg.experts:                      # the MoE layers' load-balancing loss, gradient only
            aux = aux_of(self.blocks)
            loss = loss if aux is None else WithAux.apply(loss, aux)
        return loss

    def num_params(self):
        return sum(p.data.size for p in self.parameters())
