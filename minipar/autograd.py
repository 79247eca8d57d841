"""Reverse-mode automatic differentiation, micrograd-sized but array-valued.

A `Tensor` holds an array (`.data`) and, after `backward()`, its gradient
(`.grad`). Every differentiable operation is a `Function` subclass whose
`forward(ctx, *arrays)` and `backward(ctx, grad)` sit side by side. Calling
`Fn.apply(*tensors)` runs forward and, when a gradient is needed, records a
`Node` in the graph. `backward()` visits the nodes in reverse topological order
and accumulates gradients into the leaves (parameters, inputs).

The graph keeps *nodes*, not intermediate tensors: an activation stays alive
only if a Function saved it with `ctx.save_for_backward`, which is what the
memory ledger counts (`track_saved`).

Hooks that the parallel strategies need, designed in from the start:
  * `Tensor.register_post_accumulate_grad_hook(fn)`: runs after a leaf's .grad
    was accumulated (DDP bucket all-reduce, ZeRO-2 reduce-scatter).
  * `backward(..., wgrad_queue=q)`: Functions that can split their weight
    gradient (Linear) compute dX now and append a closure computing dW to `q`;
    running it later is the zero-bubble "W" step (Qi et al. 2024).
  * `checkpoint(fn, *xs)`: activation recomputation (Chen et al. 2016).
  * `no_grad()`: run forward without building a graph.
"""
import sys
from contextlib import contextmanager

import numpy

from minipar.backend import array_module

_grad_enabled = [True]   # stack-free switch, toggled only by no_grad()
_trackers = []           # saved-activation trackers, pushed by track_saved()


@contextmanager
def no_grad():
    """Run code without recording a graph (evaluation, the optimizer step)."""
    old, _grad_enabled[0] = _grad_enabled[0], False
    try:
        yield
    finally:
        _grad_enabled[0] = old


@contextmanager
def enable_grad():
    old, _grad_enabled[0] = _grad_enabled[0], True
    try:
        yield
    finally:
        _grad_enabled[0] = old


@contextmanager
def track_saved(tracker):
    """Report every array saved for backward to `tracker.saved(nbytes)` and its
    release (after that node's backward ran) to `tracker.released(nbytes)`."""
    _trackers.append(tracker)
    try:
        yield tracker
    finally:
        _trackers.remove(tracker)


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

    # -- operator sugar (the Functions live in ops.py) -------------------------------
    def __add__(self, other): return _ops().add(self, other)
    def __radd__(self, other): return _ops().add(other, self)
    def __sub__(self, other): return _ops().sub(self, other)
    def __rsub__(self, other): return _ops().sub(other, self)
    def __mul__(self, other): return _ops().mul(self, other)
    def __rmul__(self, other): return _ops().mul(other, self)
    def __truediv__(self, other): return _ops().div(self, other)
    def __neg__(self): return _ops().mul(self, -1.0)
    def __matmul__(self, other): return _ops().matmul(self, other)
    def sum(self, axis=None, keepdims=False): return _ops().sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _ops().mean(self, axis, keepdims)
    def reshape(self, *shape): return _ops().reshape(self, shape[0] if len(shape) == 1 else shape)
    def transpose(self, *axes): return _ops().transpose(self, axes or None)


def _refs_of_an_argument(g):
    return sys.getrefcount(g)


# references an argument has inside a call when nothing else holds it (measured, not assumed:
# it differs between Python versions); one more means someone else could see the array
_EXCLUSIVE_REFS = _refs_of_an_argument(numpy.empty(0))


def _ops():
    from minipar import ops   # ops imports this module; resolve the cycle lazily
    return ops


class Context:
    """Scratch space a Function's forward leaves for its backward."""

    def __init__(self, inputs):
        # Leaf inputs (parameters, data) are kept as Tensors: a backward that needs
        # a weight reads `ctx.inputs[i].data` *then*, after a ZeRO-3 gather hook has
        # re-materialised it. Non-leaf inputs are not kept (None): their arrays stay
        # alive only if saved explicitly.
        self.inputs = tuple(t if isinstance(t, Tensor) and t.is_leaf else None for t in inputs)
        self.needs_grad = tuple(isinstance(t, Tensor) and t.requires_grad for t in inputs)
        self.saved = ()
        self.saved_bytes = 0
        self.trackers = ()        # the trackers that saw the save also see the release
        self.kept = {}            # computed (non-leaf) weights, kept by keep_weight
        self.wgrad_queue = None   # set by the engine during backward

    def save_for_backward(self, *arrays):
        self.saved = arrays
        self.saved_bytes = sum(getattr(a, "nbytes", 0) for a in arrays)
        self.trackers = tuple(_trackers)
        for tracker in self.trackers:
            tracker.saved(self.saved_bytes)

    def keep_weight(self, i, array):
        """Weights are re-read from their leaf Tensor at backward time; a computed
        weight (not a leaf) has no such Tensor, so its array is kept instead."""
        if self.inputs[i] is None:
            self.kept[i] = array

    def weight(self, i):
        """The current value of weight input i."""
        return self.inputs[i].data if self.inputs[i] is not None else self.kept[i]

    def defer(self, work):
        """Queue `work` (a weight-gradient closure) instead of running it now.

        The saved arrays it still needs stay counted until the closure has run."""
        kept, self.saved_bytes = self.saved_bytes, 0
        trackers = self.trackers

        def run():
            work()
            for tracker in trackers:
                tracker.released(kept)
        self.wgrad_queue.append(run)

    def release(self):
        for tracker in self.trackers:
            tracker.released(self.saved_bytes)
        self.saved, self.saved_bytes = (), 0


class Node:
    """One recorded Function call: its context and where its inputs came from."""
    __slots__ = ("fn", "ctx", "parents")

    def __init__(self, fn, ctx, parents):
        self.fn, self.ctx, self.parents = fn, ctx, parents


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
        needs = _grad_enabled[0] and any(isinstance(t, Tensor) and t.requires_grad for t in inputs)
        ctx = Context(inputs) if needs else _NullContext()
        out = Tensor(cls.forward(ctx, *arrays, **kwargs), requires_grad=needs)
        if needs:
            parents = tuple(_edge(t) for t in inputs)
            out._node = Node(cls, ctx, parents)
        return out


class _NullContext:
    """Context used under no_grad: saving is a no-op, nothing is recorded."""
    inputs = needs_grad = saved = ()
    wgrad_queue = None

    def save_for_backward(self, *arrays):
        pass

    def keep_weight(self, i, array):
        pass


def _edge(t):
    """Where a gradient for input `t` should go: its producing Node, the leaf itself, or nowhere."""
    if not isinstance(t, Tensor) or not t.requires_grad:
        return None
    return t._node if t._node is not None else t


def _topological_order(root):
    """Nodes reachable from root, root first, and how many edges reach each leaf."""
    order, seen, leaf_uses, stack = [], set(), {}, [(root, False)]
    while stack:                       # iterative DFS: deep graphs must not hit recursion limits
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for p in node.parents:
            if isinstance(p, Node):
                if id(p) not in seen:
                    stack.append((p, False))
            elif p is not None:
                leaf_uses[id(p)] = leaf_uses.get(id(p), 0) + 1
    return order[::-1], leaf_uses


def run_backward(tensor, grad, wgrad_queue=None):
    """Accumulate d(tensor)/d(leaf) * grad into every leaf that requires grad.

    Like PyTorch's AccumulateGrad, a leaf used several times (a tied embedding)
    receives the *sum* of its contributions in one accumulate_grad call, so its
    post-accumulate hook fires once per backward with the complete gradient."""
    if tensor._node is None:
        if tensor.requires_grad:
            tensor.accumulate_grad(grad)
        return
    order, leaf_uses = _topological_order(tensor._node)
    pending, leaf_pending = {id(tensor._node): grad}, {}
    for node in order:
        g = pending.pop(id(node), None)
        if g is None:                  # no gradient reached this node: its inputs get none from it
            grads = (None,) * len(node.parents)
        else:
            node.ctx.wgrad_queue = wgrad_queue
            grads = node.fn.backward(node.ctx, g)
            node.ctx.release()
        if not isinstance(grads, tuple):
            grads = (grads,)
        for parent, pg in zip(node.parents, grads):
            if parent is None:
                continue
            key = id(parent)
            if isinstance(parent, Node):
                if pg is not None:
                    pending[key] = pg if key not in pending else pending[key] + pg
                continue
            if pg is not None:
                leaf_pending[key] = pg if key not in leaf_pending else leaf_pending[key] + pg
            leaf_uses[key] -= 1
            if leaf_uses[key] == 0 and key in leaf_pending:
                parent.accumulate_grad(leaf_pending.pop(key))


class _Checkpoint(Function):
    """Activation recomputation: forward without saving intermediates, redo it in backward."""

    @staticmethod
    def forward(ctx, *arrays, fn):
        with no_grad():
            out = fn(*[Tensor(a) for a in arrays])
        ctx.fn = fn
        ctx.save_for_backward(*arrays)
        return out.data

    @staticmethod
    def backward(ctx, grad):
        inputs = [Tensor(a, requires_grad=need) for a, need in zip(ctx.saved, ctx.needs_grad)]
        with enable_grad():
            out = ctx.fn(*inputs)
        run_backward(out, grad, ctx.wgrad_queue)
        return tuple(t.grad for t in inputs)


def checkpoint(fn, *inputs):
    """fn(*inputs) whose internal activations are recomputed during backward.

    Only the inputs are saved; `fn` must be deterministic (dropout masks come from
    explicit seeds in minipar, so they are)."""
    return _Checkpoint.apply(*inputs, fn=fn)
