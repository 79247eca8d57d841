# python tutorials/01_autograd.py
# %% [markdown]
# # 01 · Autograd, from a scalar to the hooks that parallelism needs
#
# Everything minipar trains is differentiated by `minipar/autograd.py` (about 300
# lines) and the ops in `minipar/ops.py`. This tutorial takes the engine apart:
#
# 1. a scalar example, worked by hand and by `backward()`;
# 2. a `Function`: forward and backward side by side;
# 3. the graph, and the topological order `backward()` walks it in;
# 4. broadcasting, whose backward is a sum;
# 5. checking any gradient with finite differences;
# 6. the hooks the parallel strategies are built on: post-accumulate-grad hooks
#    (DDP, ZeRO-2), `no_grad`, deferred weight gradients (zero-bubble pipelines),
#    saved-activation tracking and recomputation (activation checkpointing).
#
# Run it as a script, or open it as a notebook with jupytext (percent format).

# %%
import numpy as np

from minipar import autograd, graph, ops
from minipar.autograd import Function, Tensor

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. A scalar example
#
# $z = x y + x$ at $x = 2, y = 3$. By hand: $\partial z/\partial x = y + 1 = 4$ and
# $\partial z/\partial y = x = 2$. A `Tensor` wraps an array; `requires_grad=True`
# marks a leaf we want the gradient of. `backward()` fills `.grad` on the leaves.

# %%
x = Tensor(np.array(2.0), requires_grad=True, name="x")
y = Tensor(np.array(3.0), requires_grad=True, name="y")
z = x * y + x
z.backward()                       # dz/dz = 1 for a scalar, then the chain rule backwards
print(f"z = {z.item()}, dz/dx = {x.grad}, dz/dy = {y.grad}")
scalar_grads = (float(x.grad), float(y.grad))

# %% [markdown]
# ## 2. A Function: forward and backward side by side
#
# Every differentiable op is a `Function` subclass. `forward(ctx, *arrays)` works on
# plain arrays and may stash what backward needs with `ctx.save_for_backward`;
# `backward(ctx, grad)` receives dL/d(output) and returns dL/d(input), one per input.
#
# For $y = \tanh(x)$: $dy/dx = 1 - y^2$, so saving the *output* is enough.

# %%
class Tanh(Function):
    """y = tanh(x);  dL/dx = dL/dy * (1 - y^2)."""

    @staticmethod
    def forward(ctx, x):
        y = np.tanh(x)
        ctx.save_for_backward(y)   # counted by the memory ledger (section 6d)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved
        return grad * (1.0 - y * y)


u = Tensor(np.array([-1.0, 0.0, 0.5]), requires_grad=True)
Tanh.apply(u).sum().backward()
print("tanh'(u) =", u.grad, " expected", 1 - np.tanh(u.data) ** 2)
tanh_grad = u.grad.copy()

# %% [markdown]
# ## 3. The graph and its topological order
#
# `Fn.apply` records a `Node` on its output: the Function, its context and, per
# input, where that input's gradient must go (the producing Node, a leaf, or
# nowhere). The graph keeps nodes, not intermediate tensors: an activation
# survives only if a Function saved it.
#
# Below, `a` feeds two branches. `backward()` must visit a node only after every
# node that consumes its output, so that the two branch gradients are summed
# before they flow further: a reverse topological order, found by one DFS.

# %%
a = Tensor(rng.standard_normal(3), requires_grad=True, name="a")
left = a * 2.0                     # Mul
right = Tanh.apply(a)              # Tanh
loss = (left * right).sum()        # Mul, then Sum

order, leaf_uses = graph.topological_order(loss._node)
print("backward visits:", " -> ".join(node.fn.__name__ for node in order))
print("edges reaching leaf a:", leaf_uses[id(a)])
loss.backward()
# d/da sum(2a * tanh a) = 2 tanh a + 2a (1 - tanh^2 a): both branches, summed
branch_sum = 2 * np.tanh(a.data) + 2 * a.data * (1 - np.tanh(a.data) ** 2)
print("a.grad =", a.grad, " by hand", branch_sum)

# %% [markdown]
# ## 4. Broadcasting's backward is a sum
#
# Adding a bias of shape (C,) to activations of shape (B, C) copies the bias B
# times. Each copy receives a gradient, so the bias gradient is their sum over
# the broadcast axis. `tensor._unbroadcast` sums a gradient down to an input's shape:
# leading axes that were added, and axes of size 1 that were stretched.

# %%
h = Tensor(rng.standard_normal((4, 3)), requires_grad=True)      # (B, C)
bias = Tensor(np.zeros(3), requires_grad=True)                   # (C,)
scale = Tensor(np.ones((4, 1)), requires_grad=True)              # (B, 1): stretched along C
g_out = rng.standard_normal((4, 3))                              # dL/d(out), (B, C)
((h + bias) * scale).backward(g_out)
print("bias.grad  =", bias.grad, "  = g_out.sum(axis=0) =", g_out.sum(axis=0))
print("scale.grad =", scale.grad.ravel(), " (shape", scale.grad.shape, ")")

# %% [markdown]
# ## 5. Checking a gradient with finite differences
#
# A backward pass can be checked against the definition of the derivative. For
# a random direction $v$, the central difference
# $\big(f(x + hv) - f(x - hv)\big) / 2h$ approaches $\langle \nabla f, v \rangle$ with
# error $O(h^2)$ plus rounding $O(\epsilon |f| / h)$: with float64 and $h = 10^{-6}$,
# about 8 to 10 matching digits. One pair of forward passes checks a whole tensor.
# The test suite does this for every op and for the whole GPT.

# %%
W = Tensor(rng.standard_normal((3, 5)), requires_grad=True)      # (C_in, C_out)
X = rng.standard_normal((4, 3))                                  # (B, C_in)
targets = np.array([0, 4, 2, -1])                                # -1: ignored by the loss


def f():
    return ops.cross_entropy(ops.gelu(ops.linear(X, W)), targets)


f().backward()
v = rng.standard_normal(W.shape)
step = 1e-6
W0 = W.data.copy()
with autograd.no_grad():
    W.data = W0 + step * v
    f_plus = f().item()
    W.data = W0 - step * v
    f_minus = f().item()
W.data = W0
finite_difference = (f_plus - f_minus) / (2 * step)
analytic = float((W.grad * v).sum())
print(f"finite difference {finite_difference:.10f}   <grad, v> {analytic:.10f}")

# %% [markdown]
# ## 6. Hooks
#
# ### 6a. Post-accumulate-grad hooks
#
# `register_post_accumulate_grad_hook(fn)` runs `fn(tensor)` right after a leaf's
# `.grad` was updated. Data parallelism uses it to start all-reducing a bucket of
# gradients while backward is still running; ZeRO-2 to reduce-scatter and free.
# A weight used twice (GPT's tied embedding: token lookup *and* output head)
# would break that if the hook fired per use, with half a gradient. Like PyTorch,
# the engine sums a leaf's contributions first: the hook fires once per backward.

# %%
E = Tensor(rng.standard_normal((5, 3)) * 0.1, requires_grad=True, name="wte")   # (V, C)
fired = []
E.register_post_accumulate_grad_hook(lambda t: fired.append(t.grad.copy()))
ids = np.array([[1, 2, 2, 4]])                                                  # (B, T)
x_emb = ops.embedding(ids, E)                                                   # (B, T, C): use 1
logits = ops.linear(x_emb, E, transpose=True)                                   # (B, T, V): use 2
ops.cross_entropy(logits, np.array([[2, 2, 4, 0]])).backward()
print(f"hook fired {len(fired)} time(s); it saw the final gradient:", np.array_equal(fired[0], E.grad))

# %% [markdown]
# ### 6b. `no_grad`
#
# Evaluation and the optimizer step need no graph. Under `no_grad()` no Node is
# recorded and nothing is saved for backward.

# %%
with autograd.no_grad():
    frozen = ops.gelu(ops.linear(X, W))
print("requires_grad:", frozen.requires_grad, " is a leaf (no graph):", frozen.is_leaf)

# %% [markdown]
# ### 6c. Deferring the weight gradient (zero-bubble pipelines)
#
# A Linear's backward has two products: $dX = dY W^T$, which the previous pipeline
# stage is waiting for, and $dW = X^T dY$, which nobody needs until the optimizer
# step. With `backward(grad, wgrad_queue=queue)` the Linear computes dX at once and
# appends a closure for dW to `queue`; a ZB-H1 schedule runs it later, in a bubble.

# %%
x_in = Tensor(rng.standard_normal((4, 3)), requires_grad=True)   # a stage's input: a leaf
W1 = Tensor(rng.standard_normal((3, 6)), requires_grad=True)
W2 = Tensor(rng.standard_normal((6, 2)), requires_grad=True)


def stage():
    return ops.linear(ops.gelu(ops.linear(x_in, W1)), W2)       # (4, 3) -> (4, 6) -> (4, 2)


g_stage = rng.standard_normal((4, 2))
stage().backward(g_stage)
reference = [t.grad.copy() for t in (x_in, W1, W2)]
for t in (x_in, W1, W2):
    t.grad = None
queue = []
stage().backward(g_stage, wgrad_queue=queue)                     # the "B" action
print("after B: x_in.grad ready:", x_in.grad is not None, "| W1.grad:", W1.grad, "| queued:", len(queue))
for work in queue:                                               # the "W" action, later
    work()
deferred_equal = all(np.array_equal(t.grad, r) for t, r in zip((x_in, W1, W2), reference))
print("after W: every gradient equals the plain backward:", deferred_equal)

# %% [markdown]
# ### 6d. Counting saved activations, and recomputing them
#
# `ctx.save_for_backward` reports bytes to every tracker installed with
# `track_saved` (the memory ledger is one); backward releases them. Activation
# checkpointing (`autograd.checkpoint(fn, *inputs)`) runs `fn` without saving its
# intermediates, keeps only the inputs, and reruns `fn` during backward.


# %%
class Bytes:
    """A minimal tracker: bytes saved for backward right now, and the most ever."""

    def __init__(self):
        self.now = self.peak = 0

    def saved(self, n):
        self.now += n
        self.peak = max(self.peak, self.now)

    def released(self, n):
        self.now -= n


def mlp(x):
    return ops.linear(ops.gelu(ops.linear(x, W1)), W2)          # (B, 3) -> (B, 6) -> (B, 2)


def saved_after_forward(recompute):
    tracker = Bytes()
    with autograd.track_saved(tracker):
        out = autograd.checkpoint(mlp, x_in) if recompute else mlp(x_in)
        kept = tracker.now
        for t in (x_in, W1, W2):
            t.grad = None
        out.backward(g_stage)
    return kept, tracker.now, [t.grad.copy() for t in (x_in, W1, W2)]


kept_plain, left_plain, grads_plain = saved_after_forward(recompute=False)
kept_ckpt, left_ckpt, grads_ckpt = saved_after_forward(recompute=True)
print(f"bytes kept between forward and backward: plain {kept_plain}, checkpointed {kept_ckpt}")
print(f"bytes still saved after backward: {left_plain} and {left_ckpt}")

# %% [markdown]
# ## Checks
#
# The script ends by asserting what each section showed, so it cannot go stale.

# %%
assert scalar_grads == (4.0, 2.0)
np.testing.assert_allclose(tanh_grad, 1 - np.tanh([-1.0, 0.0, 0.5]) ** 2)
assert [node.fn.__name__ for node in order][0] == "Sum" and leaf_uses[id(a)] == 2
np.testing.assert_allclose(a.grad, branch_sum, rtol=1e-14)
np.testing.assert_allclose(bias.grad, g_out.sum(axis=0))
assert scale.grad.shape == (4, 1)
assert abs(finite_difference - analytic) <= 1e-6 * abs(analytic) + 1e-9
assert len(fired) == 1 and np.array_equal(fired[0], E.grad)
assert not frozen.requires_grad and frozen.is_leaf
assert deferred_equal and len(queue) == 2
assert kept_ckpt == x_in.data.nbytes < kept_plain and left_plain == left_ckpt == 0
assert all(np.array_equal(p, c) for p, c in zip(grads_plain, grads_ckpt))
print("all checks passed")
