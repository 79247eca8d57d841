"""Parameters, the Module tree, and the basic layers (Linear, Embedding, LayerNorm).

Every Parameter carries a `ShardSpec`: the name it has in the serial model and
which contiguous slice of the serial array this rank holds. The serial model
holds everything (axis None); tensor and expert parallelism narrow the spec. So
the sharded model is, by construction, the serial model cut into pieces, and any
rank's expected values are `spec.take(serial_array)`. A replica (the same slice
held by several ranks) is counted in the global gradient norm by one of them:
`spec.norm_owner`.
"""
from dataclasses import dataclass

import numpy as np

from minipar import ops
from minipar.autograd import Tensor


@dataclass
class ShardSpec:
    """Which part of serial parameter `name` (shape `full_shape`) a rank holds."""
    name: str
    full_shape: tuple
    axis: int = None             # None: the whole array; else a slice along this axis
    start: int = 0
    stop: int = 0
    norm_owner: bool = True      # does this rank count the gradient in the global norm? (False: a replica)

    def take(self, full):
        """This rank's slice of a full (serial) array."""
        if self.axis is None:
            return full
        index = (slice(None),) * self.axis + (slice(self.start, self.stop),)
        return full[index]


class Parameter(Tensor):
    """A leaf tensor that the optimizer updates; `spec` says which serial array it is (or part of)."""

    def __init__(self, data, name=None):
        super().__init__(data, requires_grad=True, name=name)
        self.spec = ShardSpec(name, self.data.shape)


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


def normal(rng, shape, std, dtype):
    """N(0, std^2) initial weights, drawn in float64 and cast."""
    return (rng.standard_normal(shape) * std).astype(dtype)


class Linear(Module):
    """y = x W + b, W of shape (C_in, C_out)."""

    def __init__(self, c_in, c_out, rng, dtype, bias=True, std=0.02):
        super().__init__()
        self.weight = Parameter(normal(rng, (c_in, c_out), std, dtype))
        self.bias = Parameter(np.zeros(c_out, dtype)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


class Embedding(Module):
    """out = W[ids], W of shape (N, C); `attend` is the tied output layer x W^T."""

    def __init__(self, n, c, rng, dtype, std=0.02):
        super().__init__()
        self.weight = Parameter(normal(rng, (n, c), std, dtype))

    def forward(self, ids, dtype=None):
        return ops.embedding(ids, self.weight, dtype)

    def attend(self, x):
        """(B, T, N) = x W^T: scores of every row of the table (the tied head's logits)."""
        return ops.linear(x, self.weight, transpose=True)


class LayerNorm(Module):
    def __init__(self, c, dtype):
        super().__init__()
        self.weight = Parameter(np.ones(c, dtype))
        self.bias = Parameter(np.zeros(c, dtype))

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias)
