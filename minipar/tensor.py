"""Tensor, Function, and the arithmetic that Tensor's operators record.

A `Tensor` holds an array (`.data`) and, after `backward()`, its gradient
(`.grad`). Every differentiable operation is a `Function` subclass whose
`forward(ctx, *arrays)` and `backward(ctx, grad)` sit side by side; calling
`Fn.apply(*tensors)` runs forward and, when a gradient is needed, records a
graph.Node. `a + b`, `a @ b`, `x.sum()` ... are the Functions below, so this
module holds everything the operators need and imports only graph and backend:
the rest of the ops (ops.py, transformer_ops.py) build on it, never back.

Broadcasting: y = a + b with a (1, C) and b (B, C) gives dL/da = sum over the
broadcast axis of dL/dy (`_unbroadcast`).
"""
import math
import sys

import numpy

from minipar.backend import array_module
from minipar.graph import Context, Node, NullContext, grad_mode, run_backward


class Tensor:
    """An array plus what is needed to differentiate through it."""

    def __init__(self, data, requires_grad=False, name=None):
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.name = name
        self._node = None      # the Node that produced this tensor (None for leaves)
        self._hooks = []       # post-accumulate-grad hooks (leaves only)

    # -- array-like conveniences -------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    is_leaf = property(lambda self: self._node is None)

    def __repr__(self):
        label = f" {self.name!r}" if self.name else ""
        return f"Tensor{label}(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    def detach(self):
        return Tensor(self.data)

    def item(self):
        return float(self.data)

    # -- gradient bookkeeping ------------------------------------------------------
    def register_post_accumulate_grad_hook(self, fn):
        """fn(tensor) runs every time a gradient has been added into this leaf's .grad."""
        self._hooks.append(fn)
        return fn

    def accumulate_grad(self, g):
        """.grad += g (stored in the tensor's own dtype), then run the hooks.

        The first gradient is adopted without a copy when no one else can see it, as
        PyTorch's AccumulateGrad steals a gradient whose use count is 1: a NumPy array
        of this dtype that owns its contiguous memory and that only this call references."""
        if self.grad is None:
            adopt = (type(g) is numpy.ndarray and g.dtype == self.data.dtype and g.base is None
                     and g.flags.c_contiguous and sys.getrefcount(g) <= _EXCLUSIVE_REFS)
            self.grad = g if adopt else g.astype(self.data.dtype, copy=True)
        else:
            self.grad += g
        for hook in self._hooks:
            hook(self)

    def backward(self, grad=None, wgrad_queue=None):
        """Back-propagate from this tensor; `grad` defaults to 1 for a scalar."""
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError("backward() without a gradient needs a scalar tensor")
            grad = array_module(self.data).ones_like(self.data)
        run_backward(self, grad, wgrad_queue)

    # -- operator sugar: the Functions below -----------------------------------------
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __neg__(self): return mul(self, -1.0)
    def __matmul__(self, other): return matmul(self, other)
    def sum(self, axis=None, keepdims=False): return sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return mean(self, axis, keepdims)
    def reshape(self, *shape): return reshape(self, shape[0] if len(shape) == 1 else shape)
    def transpose(self, *axes): return transpose(self, axes or None)


def _refs_of_an_argument(g):
    return sys.getrefcount(g)


# references an argument has inside a call when nothing else holds it (measured, not assumed:
# it differs between Python versions); one more means someone else could see the array
_EXCLUSIVE_REFS = _refs_of_an_argument(numpy.empty(0))


class Function:
    """Subclass with static `forward(ctx, *arrays, **kw)` and `backward(ctx, grad)`.

    backward returns one gradient per positional input (None where no gradient
    flows); the engine skips inputs that do not require grad.
    """

    @staticmethod
    def forward(ctx, *arrays, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **kwargs):
        arrays = [t.data if isinstance(t, Tensor) else t for t in inputs]
        needs = tuple(isinstance(t, Tensor) and t.requires_grad for t in inputs)
        record = grad_mode.enabled and any(needs)
        if record:
            ctx = Context(tuple(t if isinstance(t, Tensor) and t.is_leaf else None for t in inputs), needs)
        else:
            ctx = NullContext()
        out = Tensor(cls.forward(ctx, *arrays, **kwargs), requires_grad=record)
        if record:
            out._node = Node(cls, ctx, tuple(_edge(t) for t in inputs))
        return out


def _edge(t):
    """Where a gradient for input `t` should go: its producing Node, the leaf itself, or nowhere."""
    if not isinstance(t, Tensor) or not t.requires_grad:
        return None
    return t._node if t._node is not None else t


# ---- elementwise arithmetic with broadcasting ------------------------------------------
def _unbroadcast(g, shape):
    """Sum g down to `shape` (the backward of numpy broadcasting)."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    for axis, n in enumerate(shape):
        if n == 1 and g.shape[axis] != 1:
            g = g.sum(axis=axis, keepdims=True)
    return g


def _shape(x):
    return getattr(x, "shape", ())


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (_shape(a), _shape(b))
        return a + b

    @staticmethod
    def backward(ctx, g):
        return _unbroadcast(g, ctx.shapes[0]), _unbroadcast(g, ctx.shapes[1])


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (_shape(a), _shape(b))
        return a - b

    @staticmethod
    def backward(ctx, g):
        return _unbroadcast(g, ctx.shapes[0]), _unbroadcast(-g, ctx.shapes[1])


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        return _unbroadcast(g * b, _shape(a)), _unbroadcast(g * a, _shape(b))


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        return _unbroadcast(g / b, _shape(a)), _unbroadcast(-g * a / (b * b), _shape(b))


# ---- reductions, shapes, matmul ----------------------------------------------------------
class Sum(Function):
    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        return x.sum(axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        xp = array_module(g)
        if ctx.axis is not None and not ctx.keepdims:
            g = xp.expand_dims(g, ctx.axis)
        return xp.broadcast_to(g, ctx.shape).copy()


class Reshape(Function):
    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape)


class Transpose(Function):
    @staticmethod
    def forward(ctx, x, axes=None):
        ctx.axes = axes
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, g):
        # the inverse permutation, worked out on the host: axes are Python ints, not device data
        inverse = None if ctx.axes is None else tuple(sorted(range(len(ctx.axes)), key=ctx.axes.__getitem__))
        return g.transpose(inverse)


class MatMul(Function):
    """Batched a @ b over the last two axes; leading axes broadcast."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved
        ga = g @ b.swapaxes(-1, -2)
        gb = a.swapaxes(-1, -2) @ g
        return _unbroadcast(ga, a.shape), _unbroadcast(gb, b.shape)


add, sub, mul, div = Add.apply, Sub.apply, Mul.apply, Div.apply
matmul, reshape, transpose = MatMul.apply, Reshape.apply, Transpose.apply


def sum(x, axis=None, keepdims=False):   # noqa: A001 - mirrors numpy's name
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    n = x.data.size if axis is None else math.prod(
        x.shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
    return mul(sum(x, axis, keepdims), 1.0 / n)
