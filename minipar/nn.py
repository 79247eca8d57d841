"""Modules and the GPT (Radford et al. 2019), nanoGPT-shaped.

    idx (B, T) -> wte[idx] + wpe[0:T] -> dropout -> n_layer x Block -> ln_f -> logits (B, T, V)
    Block:  x = x + drop(attn(ln_1(x)));  x = x + drop(mlp(ln_2(x)))

Every Parameter carries a `ShardSpec`: the name it has in the serial model and
which contiguous slice of the serial array this rank holds. The serial model
holds everything (axis None); tensor parallelism narrows the spec. So the
sharded model is, by construction, the serial model cut into pieces, and any
rank's expected values are `spec.take(serial_array)`.
"""
from dataclasses import dataclass, field

import numpy as np

from minipar import ops
from minipar.autograd import Tensor
from minipar.backend import array_module
from minipar.backend import precision as get_precision


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


@dataclass
class ShardSpec:
    """Which part of serial parameter `name` (shape `full_shape`) a rank holds."""
    name: str
    full_shape: tuple
    axis: int = None             # None: the whole array; else a slice along this axis
    start: int = 0
    stop: int = 0

    def take(self, full):
        """This rank's slice of a full (serial) array."""
        if self.axis is None:
            return full
        index = (slice(None),) * self.axis + (slice(self.start, self.stop),)
        return full[index]


class Parameter(Tensor):
    """A leaf tensor that the optimizer updates."""

    def __init__(self, data, name=None):
        super().__init__(data, requires_grad=True, name=name)
        self.spec = None


class Module:
    """Parameters and sub-modules found by attribute scan, plus forward hooks.

    Pre-hooks run as hook(module, args) and may return new args; post-hooks run
    as hook(module, args, output) and may return a new output (ZeRO-3 uses both).
    """

    def __init__(self):
        self._pre_hooks, self._post_hooks = [], []
        self.training = True

    def __call__(self, *args):
        for hook in self._pre_hooks:
            args = hook(self, args) or args
        out = self.forward(*args)
        for hook in self._post_hooks:
            new = hook(self, args, out)
            out = out if new is None else new
        return out

    def register_forward_pre_hook(self, hook):
        self._pre_hooks.append(hook)
        return hook

    def register_forward_hook(self, hook):
        self._post_hooks.append(hook)
        return hook

    def named_children(self):
        for key, value in vars(self).items():
            if isinstance(value, Module):
                yield key, value
            elif isinstance(value, list):
                yield from ((f"{key}.{i}", m) for i, m in enumerate(value) if isinstance(m, Module))

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self, prefix=""):
        for key, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + key, value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def train(self, mode=True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        return {name: p.data for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        own = dict(self.named_parameters())
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"state_dict mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, p in own.items():
            if state[name].shape != p.data.shape:
                raise ValueError(f"state_dict mismatch: {name} has shape {state[name].shape}, "
                                 f"model expects {p.data.shape}")
            p.data[...] = state[name]

    def save(self, path):
        np.savez(path, **self.state_dict())

    def load(self, path):
        with np.load(path, allow_pickle=False) as f:
            self.load_state_dict({k: f[k] for k in f.files})


def _normal(rng, shape, std, dtype):
    return (rng.standard_normal(shape) * std).astype(dtype)


class Linear(Module):
    """y = x W + b, W of shape (C_in, C_out)."""

    def __init__(self, c_in, c_out, rng, dtype, bias=True, std=0.02):
        super().__init__()
        self.weight = Parameter(_normal(rng, (c_in, c_out), std, dtype))
        self.bias = Parameter(np.zeros(c_out, dtype)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


class Embedding(Module):
    def __init__(self, n, c, rng, dtype, std=0.02):
        super().__init__()
        self.weight = Parameter(_normal(rng, (n, c), std, dtype))

    def forward(self, ids, dtype=None):
        return ops.embedding(ids, self.weight, dtype)


class LayerNorm(Module):
    def __init__(self, c, dtype):
        super().__init__()
        self.weight = Parameter(np.ones(c, dtype))
        self.bias = Parameter(np.zeros(c, dtype))

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention; c_attn packs q, k, v head-major: (C, H*3*D)."""

    def __init__(self, cfg, rng, dtype):
        super().__init__()
        c = cfg.d_model
        self.n_head = cfg.n_head                       # heads held by this rank (H/tp under TP)
        self.n_head_total = cfg.n_head                 # H in the serial model
        self.head_slice = slice(0, cfg.n_head)         # which of the H serial heads this rank holds
        self.p = cfg.dropout
        self.c_attn = Linear(c, 3 * c, rng, dtype)
        self.c_proj = Linear(c, c, rng, dtype, std=0.02 / np.sqrt(2 * cfg.n_layer))
        self.site = 0                                  # dropout site id, set by Block

    def forward(self, x, key=None):
        qkv = self.c_attn(x)                           # (B, T, 3C/tp)
        keep = None
        if self.p and self.training:                   # mask rows are (H, T, T); this rank keeps its heads
            T = qkv.shape[1]
            keep = key.keep(self.site, (self.n_head_total, T, T), self.p)[:, self.head_slice]   # (B, H/tp, T, T)
        y = ops.causal_attention(qkv, self.n_head, keep, self.p)   # (B, T, C/tp)
        return self.c_proj(y)                          # (B, T, C)


class MLP(Module):
    def __init__(self, cfg, rng, dtype):
        super().__init__()
        c = cfg.d_model
        self.fc = Linear(c, 4 * c, rng, dtype)
        self.proj = Linear(4 * c, c, rng, dtype, std=0.02 / np.sqrt(2 * cfg.n_layer))

    def forward(self, x):
        return self.proj(ops.gelu(self.fc(x)))        # (B, T, 4C) -> (B, T, C)


class Block(Module):
    def __init__(self, cfg, rng, dtype, index):
        super().__init__()
        self.index = index
        self.ln_1 = LayerNorm(cfg.d_model, dtype)
        self.attn = CausalSelfAttention(cfg, rng, dtype)
        self.ln_2 = LayerNorm(cfg.d_model, dtype)
        if cfg.is_moe(index):
            from minipar.moe import MoE      # moe.py builds on this file's modules
            self.mlp = MoE(cfg, rng, dtype)
        else:
            self.mlp = MLP(cfg, rng, dtype)
        self.p, self.seq_len = cfg.dropout, cfg.seq_len
        self.attn.site = 3 * index + 3                 # dropout sites: 0 embedding, then 3 per block

    def forward(self, x, key=None):
        x = x + self.drop(self.attn(self.ln_1(x), key), key, 3 * self.index + 1)
        return x + self.drop(self.mlp(self.ln_2(x)), key, 3 * self.index + 2)

    def drop(self, x, key, site):
        """Residual dropout; under sequence / context parallelism `key.seq` cuts each row's T axis."""
        if self.p == 0.0 or not self.training:
            return x
        if key.seq is None:
            return ops.dropout(x, key.keep(site, x.shape[1:], self.p), self.p)
        full_row = (self.seq_len,) + x.shape[2:]                        # (T, C): draw the serial row
        return ops.dropout(x, key.keep(site, full_row, self.p)[:, key.seq], self.p)   # (B, T/tp, C)


@dataclass
class DropoutKey:
    """Addresses every dropout mask by (seed, step, global sample index, site).

    A mask row depends only on the sample's global index, so any DP/PP slice of
    the batch draws exactly the rows the serial run drew. Each rank draws the
    *full* row and keeps its part, so an assembled TP/SP/CP mask is the serial mask:
    `seq` is this rank's positions of T under sequence and/or context parallelism
    (a slice, or an index array for context parallelism's chunks; None = all of T)."""
    seed: int
    step: int
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seq: object = None           # this rank's positions of T: slice or index array (None = all)

    def keep(self, site, row, p):
        """Boolean keep-mask (B, *row): one full serial row per sample, P(keep) = 1 - p."""
        return np.stack([np.random.default_rng([self.seed, self.step, int(s), site]).random(row) >= p
                         for s in self.samples])     # a loop over samples only, never elements


class GPT(Module):
    """The serial model: the oracle every parallel run is compared against."""

    def __init__(self, cfg, seed=0):
        super().__init__()
        self.cfg = cfg
        self.precision = get_precision(cfg.precision)
        rng, dtype = np.random.default_rng(seed), self.precision.param_dtype
        self.wte = Embedding(cfg.vocab_size, cfg.d_model, rng, dtype)
        self.wpe = Embedding(cfg.seq_len, cfg.d_model, rng, dtype)
        self.blocks = [Block(cfg, rng, dtype, i) for i in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.d_model, dtype)
        self.lm_head = None if cfg.tied_embeddings else Linear(cfg.d_model, cfg.vocab_size, rng, dtype, bias=False)
        self.seq_chunk = None    # context parallelism: this rank's chunk(s) of T (a ContextShard); None = all
        for name, p in self.named_parameters():
            p.name, p.spec = name, ShardSpec(name, p.data.shape)

    def local_tokens(self, idx):
        """(ids, positions) of the tokens this model runs: all of idx (B, T) and 0..T-1, or under
        context parallelism this rank's columns (B, T/cp) and their serial positions."""
        if self.seq_chunk is None:
            return idx, array_module(self.wpe.weight.data).arange(idx.shape[1])
        return self.seq_chunk.take(idx), self.seq_chunk.device_positions

    def dropout_key(self, seed, step, samples):
        """The DropoutKey of these samples; under context parallelism it cuts rows at this rank's positions."""
        return DropoutKey(seed, step, samples, seq=None if self.seq_chunk is None else self.seq_chunk.positions)

    # The three pieces a pipeline stage is made of: embed (first stage), blocks, head (last stage).
    def embed(self, idx, key=None):
        idx, positions = self.local_tokens(idx)                          # (B, T[/cp]), (T[/cp],)
        compute = self.precision.compute_dtype
        x = self.wte(idx, compute) + self.wpe(positions, compute)       # (B, T, C) + (T, C)
        if self.cfg.dropout and self.training:
            if key.seq is None:
                keep = key.keep(0, x.shape[1:], self.cfg.dropout)
            else:                                                        # the serial rows, cut at my positions
                keep = key.keep(0, (self.cfg.seq_len,) + x.shape[2:], self.cfg.dropout)[:, key.seq]
            x = ops.dropout(x, keep, self.cfg.dropout)
        return x

    def head(self, x):
        x = self.ln_f(x)                                          # (B, T, C)
        if self.lm_head is None:
            return ops.linear(x, self.wte.weight, transpose=True)  # (B, T, V) = x wte^T
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
        """Mean cross-entropy over the scored targets of these logits (TP: vocab-parallel)."""
        return ops.cross_entropy(logits, targets)

    def predict(self, logits):
        """Greedy next-token ids (B, T) from logits (under cp gathered from every cp rank)."""
        ids = self.token_argmax(logits)
        return ids if self.seq_chunk is None else self.seq_chunk.gather(ids)

    def token_argmax(self, logits):
        """Greedy ids of these logits' tokens (TP overrides: vocab is sharded)."""
        return logits.data.argmax(axis=-1)

    def loss(self, idx, targets, key=None):
        if key is None and self.cfg.dropout and self.training:
            raise ValueError("dropout > 0 in training needs a DropoutKey (seed, step, sample indices)")
        loss = self.criterion(self(idx, key), targets)
        if self.cfg.experts:                      # the MoE layers' load-balancing loss, gradient only
            from minipar.moe import WithAux, aux_of
            aux = aux_of(self.blocks)
            loss = loss if aux is None else WithAux.apply(loss, aux)
        return loss

    def num_params(self):
        return sum(p.data.size for p in self.parameters())
