"""The autograd engine (minipar/autograd.py): graph building, topological order,
accumulation, and each hook the parallel strategies rely on:

  post-accumulate-grad hooks   DDP bucket all-reduce, ZeRO-2 reduce-scatter
  no_grad                      evaluation and optimizer steps build no graph
  backward(wgrad_queue=...)    zero-bubble: dX now, dW as closures run later
  checkpoint                   activation recomputation
  track_saved                  saved-activation bytes feed the memory ledger
Serial, float64. Module forward hooks are tested in test_nn.py."""
import numpy as np
import pytest
from hypothesis import given, settings

from minipar import autograd, ops
from minipar.autograd import Function, Tensor
from strategies import check_gradients, seeds, shapes


pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

class Tracker:
    """A track_saved() tracker: bytes saved for backward now, at peak and in total."""

    def __init__(self):
        self.current = self.peak = self.total = 0

    def saved(self, nbytes):
        self.current += nbytes
        self.total += nbytes
        self.peak = max(self.peak, self.current)

    def released(self, nbytes):
        self.current -= nbytes
        assert self.current >= 0, "released more bytes than were saved"


def param(rng, *shape, name=None):
    return Tensor(rng.standard_normal(shape), requires_grad=True, name=name)


# ----------------------------------------------------------------------------- the engine

def test_scalar_example():
    x, y = Tensor(np.array(2.0), requires_grad=True), Tensor(np.array(3.0), requires_grad=True)
    z = x * y + x                                                      # dz/dx = y + 1, dz/dy = x
    z.backward()
    assert z.item() == 8.0 and x.grad == 4.0 and y.grad == 2.0


class Cube(Function):
    """y = x^3, dy/dx = 3 x^2: a user-defined Function, forward and backward side by side."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        return g * 3 * x ** 2


@settings(max_examples=20, deadline=None)
@given(shape=shapes(), seed=seeds)
def test_user_defined_function(shape, seed):
    (x,) = [param(np.random.default_rng(seed), *shape)]
    y = Cube.apply(x)
    assert y.requires_grad and not y.is_leaf and x.is_leaf
    np.testing.assert_array_equal(y.data, x.data ** 3)
    check_gradients(lambda: Cube.apply(x), [x], seed)


class Tag(Function):
    """Identity that records, in `log`, its name and the gradient its backward received."""

    @staticmethod
    def forward(ctx, x, name, log):
        ctx.name, ctx.log = name, log
        return x

    @staticmethod
    def backward(ctx, g):
        ctx.log.append((ctx.name, np.array(g)))
        return g


def test_backward_runs_in_topological_order_and_sums_branches():
    """a feeds b and c, both feed d: a's backward runs once, last, with both branches' sum."""
    log = []
    x = Tensor(np.ones(3), requires_grad=True)
    a = Tag.apply(x, name="a", log=log)
    b, c = Tag.apply(a * 2.0, name="b", log=log), Tag.apply(a * 3.0, name="c", log=log)
    d = Tag.apply(b + c, name="d", log=log)
    d.sum().backward()
    names = [name for name, _ in log]
    assert names[0] == "d" and sorted(names[1:3]) == ["b", "c"] and names[3:] == ["a"]
    np.testing.assert_array_equal(log[-1][1], np.full(3, 5.0))         # 2 + 3
    np.testing.assert_array_equal(x.grad, np.full(3, 5.0))


def test_same_tensor_twice_in_one_op():
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, -4.0])


def test_deep_graph_does_not_hit_the_recursion_limit():
    x = Tensor(np.ones(2), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0 + 0.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


def test_grads_accumulate_across_backward_calls_until_cleared():
    x = Tensor(np.ones(2), requires_grad=True)
    (x * 3.0).sum().backward()
    (x * 4.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])


def test_what_gets_a_gradient():
    x, const = Tensor(np.ones(2), requires_grad=True), Tensor(np.ones(2))
    (x * const + 1.0).sum().backward()
    assert const.grad is None and (x * const).requires_grad and not (const * 2.0).requires_grad
    with pytest.raises(RuntimeError, match="scalar"):
        (x * 2.0).backward()                                           # non-scalar needs a gradient


def test_backward_accepts_an_explicit_output_gradient():
    x = Tensor(np.arange(3.0), requires_grad=True)
    (x * 2.0).backward(np.array([1.0, 10.0, 100.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 20.0, 200.0])


def test_default_seed_gradient_is_one_even_for_an_infinite_output():
    x = Tensor(np.array([np.inf, 1.0]), requires_grad=True)
    x.sum().backward()                                                 # the seed is ones, not inf * 0 + 1
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


# ----------------------------------------------------------------------------- post-accumulate-grad hooks

def test_hook_fires_once_per_backward_with_the_full_gradient_of_a_tied_weight():
    """w is used twice, as an embedding table and (transposed) as the output head."""
    rng = np.random.default_rng(0)
    w = param(rng, 5, 3)
    ids, targets = rng.integers(0, 5, (2, 4)), rng.integers(0, 5, (2, 4))
    seen = []
    w.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.copy()))

    def loss():
        h = ops.gelu(ops.embedding(ids, w))                            # (B, T, C)
        return ops.cross_entropy(ops.linear(h, w, transpose=True), targets)   # (B, T, V) logits

    loss().backward()
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], w.grad)
    w.grad = None
    loss().backward()
    loss().backward()                                                  # hook sees the running sum
    assert len(seen) == 3
    np.testing.assert_array_equal(seen[-1], 2 * seen[0])
    check_gradients(loss, [w], seed=0)                                 # and that gradient is right


def test_hook_fires_for_every_leaf_after_its_grad_is_set():
    rng = np.random.default_rng(1)
    a, b = param(rng, 3), param(rng, 3)
    fired = []
    for t, name in ((a, "a"), (b, "b")):
        t.register_post_accumulate_grad_hook(lambda t, name=name: fired.append((name, t.grad is not None)))
    (a * b).sum().backward()
    assert sorted(fired) == [("a", True), ("b", True)]


# ----------------------------------------------------------------------------- no_grad

def test_no_grad_builds_no_graph_and_saves_nothing():
    rng = np.random.default_rng(2)
    x, w = param(rng, 4, 3), param(rng, 3, 2)
    tracker = Tracker()
    with autograd.track_saved(tracker), autograd.no_grad():
        y = ops.gelu(ops.linear(x, w)) * x.sum()
        with autograd.no_grad():
            pass
        z = x * 2.0                                                    # still off after the nested block
    assert tracker.total == 0
    assert not y.requires_grad and y.is_leaf and not z.requires_grad
    assert (x * 2.0).requires_grad                                     # back on outside


# ----------------------------------------------------------------------------- deferred weight gradients

def mlp_stage(rng):
    """A pipeline-stage-like graph: input leaf x, two Linears (one transposed), a LayerNorm."""
    x = param(rng, 2, 3, 4, name="x")
    w1, b1, w2 = param(rng, 4, 6, name="w1"), param(rng, 6, name="b1"), param(rng, 4, 6, name="w2")
    ln_w, ln_b = param(rng, 4, name="ln_w"), param(rng, 4, name="ln_b")

    def forward():
        h = ops.gelu(ops.linear(ops.layer_norm(x, ln_w, ln_b), w1, b1))   # (B, T, 6)
        return ops.linear(h, w2, transpose=True)                       # (B, T, 4)
    return forward, x, [w1, b1, w2], [ln_w, ln_b]


def test_deferred_weight_grads_equal_normal_backward():
    forward, x, linear_params, other = mlp_stage(np.random.default_rng(3))
    g = np.random.default_rng(4).standard_normal((2, 3, 4))
    forward().backward(g)
    expected = {t.name: t.grad.copy() for t in [x, *linear_params, *other]}
    for t in [x, *linear_params, *other]:
        t.grad = None
    fired = []
    for t in linear_params:
        t.register_post_accumulate_grad_hook(lambda t: fired.append(t.name))

    queue = []
    forward().backward(g, wgrad_queue=queue)                           # the zero-bubble "B" step
    np.testing.assert_array_equal(x.grad, expected["x"])               # dX is ready now
    for t in other:                                                    # LayerNorm does not defer
        np.testing.assert_array_equal(t.grad, expected[t.name])
    assert all(t.grad is None for t in linear_params) and fired == [] and len(queue) == 2
    for work in queue:                                                 # the "W" step, later
        work()
    for t in linear_params:
        np.testing.assert_array_equal(t.grad, expected[t.name])
    assert sorted(fired) == ["b1", "w1", "w2"]


def test_deferred_closures_keep_their_saved_bytes_until_they_run():
    forward, x, linear_params, _ = mlp_stage(np.random.default_rng(5))
    tracker, queue = Tracker(), []
    with autograd.track_saved(tracker):
        out = forward()
        out.backward(np.ones(out.shape), wgrad_queue=queue)
        kept = tracker.current
        assert kept == x.data.nbytes + 6 * x.data.nbytes // 4          # each Linear's input (B*T, C_in)
        queue.pop()()
        assert 0 < tracker.current < kept
        queue.pop()()
    assert tracker.current == 0 and tracker.total > kept


def test_a_computed_weight_gets_its_gradient_now_even_with_a_queue():
    """Only leaf weights can take a deferred dW: a computed weight's gradient must flow on."""
    rng = np.random.default_rng(10)
    x, w = param(rng, 4, 3), param(rng, 3, 2)
    queue = []
    ops.linear(x, w * 2.0).backward(np.ones((4, 2)), wgrad_queue=queue)
    assert queue == []
    np.testing.assert_allclose(w.grad, 2.0 * x.data.T @ np.ones((4, 2)), rtol=1e-15)


# ----------------------------------------------------------------------------- saved-tensor accounting

def test_saved_bytes_are_counted_and_return_to_zero_after_backward():
    rng = np.random.default_rng(6)
    x, w = param(rng, 5, 4), param(rng, 4, 3)
    tracker = Tracker()
    with autograd.track_saved(tracker):
        y = ops.gelu(ops.linear(x, w))                                 # saves x; then x W and tanh
        assert tracker.current == x.data.nbytes + 2 * y.data.nbytes
        y.sum().backward()
    assert tracker.current == 0 and tracker.peak == x.data.nbytes + 2 * y.data.nbytes


def test_tracker_sees_the_release_of_what_it_saw_saved():
    rng = np.random.default_rng(7)
    x = param(rng, 5, 4)
    tracker = Tracker()
    with autograd.track_saved(tracker):
        y = ops.gelu(x)                                                # forward (e.g. a pipeline F action)
    y.sum().backward()                                                 # backward later, outside (B action)
    assert tracker.current == 0 and tracker.total > 0
    late = Tracker()
    z = ops.gelu(x)                                                    # saved while nobody was tracking
    with autograd.track_saved(late):
        z.sum().backward()                                             # so nothing is released to `late`
    assert late.current == late.total == 0


# ----------------------------------------------------------------------------- recomputation

def residual_blocks(rng, n, width):
    params = [[param(rng, width, 2 * width), param(rng, 2 * width), param(rng, 2 * width, width)]
              for _ in range(n)]

    def block(x, w1, b1, w2):
        return x + ops.linear(ops.gelu(ops.linear(x, w1, b1)), w2)      # (N, C) -> (N, 2C) -> (N, C)
    return block, params


@pytest.mark.parametrize("n_blocks", [1, 4])
def test_checkpoint_gives_identical_grads_and_keeps_fewer_bytes(n_blocks):
    rng = np.random.default_rng(8)
    block, params = residual_blocks(rng, n_blocks, 4)
    x = param(rng, 6, 4)
    leaves = [x] + [p for ps in params for p in ps]

    def run(recompute):
        for t in leaves:
            t.grad = None
        tracker = Tracker()
        with autograd.track_saved(tracker):
            h = x
            for w1, b1, w2 in params:
                fn = lambda h, w1=w1, b1=b1, w2=w2: block(h, w1, b1, w2)
                h = autograd.checkpoint(fn, h) if recompute else fn(h)
            after_forward = tracker.current
            ops.cross_entropy(h, np.arange(6) % 4).backward()
        assert tracker.current == 0
        return [t.grad.copy() for t in leaves], after_forward, tracker.peak

    grads, kept, peak = run(recompute=False)
    grads_ckpt, kept_ckpt, peak_ckpt = run(recompute=True)
    for g, gc in zip(grads, grads_ckpt):
        np.testing.assert_array_equal(g, gc)                           # recomputation is exact
    assert kept_ckpt < kept
    assert kept_ckpt == n_blocks * x.data.nbytes                       # only each block's input
    if n_blocks > 1:
        assert peak_ckpt < peak                                        # one block's activations at a time


def test_checkpoint_only_differentiates_inputs_that_require_grad():
    rng = np.random.default_rng(9)
    x, w = param(rng, 3, 2), param(rng, 2, 2)
    data = Tensor(rng.standard_normal((3, 2)))
    out = autograd.checkpoint(lambda a, b: ops.linear(a * b, w), x, data)
    out.sum().backward()
    assert data.grad is None and x.grad.shape == (3, 2) and w.grad.shape == (2, 2)
