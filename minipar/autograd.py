"""Reverse-mode automatic differentiation, micrograd-sized but array-valued.

The public face of three small layers, each importing only the ones before it:

    graph.py     grad mode, Context, Node, the reverse topological sweep (run_backward)
    tensor.py    Tensor, Function, and the arithmetic Tensor's operators record
    autograd.py  this file: the names users import, and activation checkpointing

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
from minipar.graph import enable_grad, grad_mode, no_grad, run_backward, track_saved
from minipar.tensor import Function, Tensor

__all__ = ["Function", "Tensor", "checkpoint", "enable_grad", "grad_mode", "no_grad",
           "run_backward", "track_saved"]


class Checkpoint(Function):
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
    return Checkpoint.apply(*inputs, fn=fn)
