"""The recorded graph and its reverse sweep: grad mode, Context, Node, backward.

This is the half of autograd that knows nothing of Tensor's arithmetic. A
Function call that needs a gradient leaves a `Node` (which Function, its
`Context`, where its inputs came from); `run_backward` visits the nodes in
reverse topological order, calling each Function's backward with the gradient
of its output, and accumulates into the leaves (parameters, inputs):

    dL/dx_i = sum over uses of x_i of  (dL/dy) (dy/dx_i)      (the chain rule)

Whether a call is recorded is `grad_mode.enabled`, switched only by the
`no_grad()` / `enable_grad()` context managers; what saved activations cost is
reported to the trackers `track_saved()` pushes (the memory ledger).
"""
from contextlib import contextmanager


class GradMode:
    """The one piece of autograd state: record graphs or not, and who counts saved arrays."""

    def __init__(self):
        self.enabled = True     # False inside no_grad(): Function.apply records nothing
        self.trackers = []      # saved-activation trackers, pushed by track_saved()


grad_mode = GradMode()


@contextmanager
def _recording(enabled):
    old, grad_mode.enabled = grad_mode.enabled, enabled
    try:
        yield
    finally:
        grad_mode.enabled = old


def no_grad():
    """Run code without recording a graph (evaluation, the optimizer step)."""
    return _recording(False)


def enable_grad():
    """Record a graph again inside a no_grad() region (activation recomputation)."""
    return _recording(True)


@contextmanager
def track_saved(tracker):
    """Report every array saved for backward to `tracker.saved(nbytes)` and its
    release (after that node's backward ran) to `tracker.released(nbytes)`."""
    grad_mode.trackers.append(tracker)
    try:
        yield tracker
    finally:
        grad_mode.trackers.remove(tracker)


class Context:
    """Scratch space a Function's forward leaves for its backward.

    `leaves`: per input, the leaf Tensor (parameters, data) or None. A backward that
    needs a weight reads `ctx.inputs[i].data` *then*, after a ZeRO-3 gather hook has
    re-materialised it. Non-leaf inputs are not kept: their arrays stay alive only if
    saved explicitly. `needs_grad`: per input, whether a gradient must flow to it."""

    def __init__(self, leaves, needs_grad):
        self.inputs, self.needs_grad = leaves, needs_grad
        self.saved = ()
        self.saved_bytes = 0
        self.trackers = ()        # the trackers that saw the save also see the release
        self.kept = {}            # computed (non-leaf) weights, kept by keep_weight
        self.wgrad_queue = None   # set by run_backward

    def save_for_backward(self, *arrays):
        self.saved = arrays
        self.saved_bytes = sum(getattr(a, "nbytes", 0) for a in arrays)
        self.trackers = tuple(grad_mode.trackers)
        for tracker in self.trackers:
            tracker.saved(self.saved_bytes)

    def keep_weight(self, i, array):
        """Weights are re-read from their leaf Tensor at backward time; a computed
        weight (not a leaf) has no such Tensor, so its array is kept instead."""
        if self.inputs[i] is None:
            self.kept[i] = array

    def weight(self, i, like=None):
        """The current value of weight input i; in the dtype of array `like` if given."""
        w = self.inputs[i].data if self.inputs[i] is not None else self.kept[i]
        return w if like is None else w.astype(like.dtype, copy=False)

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


class NullContext:
    """The context of an unrecorded call (no_grad, or no input needs a gradient)."""
    inputs = needs_grad = saved = ()
    wgrad_queue = None

    def save_for_backward(self, *arrays):
        pass

    def keep_weight(self, i, array):
        pass


class Node:
    """One recorded Function call: its context and where its inputs came from
    (per input: the producing Node, a leaf Tensor, or None)."""
    __slots__ = ("fn", "ctx", "parents")

    def __init__(self, fn, ctx, parents):
        self.fn, self.ctx, self.parents = fn, ctx, parents


def topological_order(root):
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
    order, leaf_uses = topological_order(tensor._node)
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
