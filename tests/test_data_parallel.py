"""DDP (minipar/parallel/data/ddp.py) against the serial oracle, its bytes and its overlap.

Parity: hypothesis draws a layout (dp in {1, 2, 4, 8}, global batch, bucket size from
one parameter per bucket to a single bucket, gradient-accumulation micro-batches,
overlap on/off, seed). A dp-rank block (the `group_of` fixture) trains the tiny GPT
for k AdamW steps in lockstep with the serial Engine on every rank; after each step
the loss, every gradient, parameter and Adam m, v must equal the serial ones.
Both collective algorithms run: MPI's own ("mpi") and ring.py's Sendrecv loops ("ring").

Volume: the dp group's comm ledger must show, per rank and per step, exactly

    2 (N-1)/N * Phi * itemsize      bytes sent (a ring all-reduce of the Phi gradients),

one all-reduce per bucket, and nothing at all before the last micro-batch.

Overlap: with several buckets, the first bucket's all-reduce is launched while
backward is still producing gradients (hook events are recorded in order).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import parity
from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.parity import agree
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.nn import GPTConfig
from minipar.parallel.data.ddp import DataParallel

from strategies import seeds

pytestmark = pytest.mark.dp

WORLD = Group.world().size
DP_SIZES = [n for n in (1, 2, 4, 8) if n <= WORLD and WORLD % n == 0]
TASK = ReverseTask(n_digits=4)                      # vocab 11, sequences of 8 tokens
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1, max_norm=1.0)
# 1 byte: every parameter gets its own bucket; 2**30: one bucket holds them all
BUCKET_BYTES = [1, 700, 4096, 2 ** 30]
FP64_TOL = 1e-11                                   # tighter than parity.TOLERANCE["fp64"]


def tiny_config(precision="fp64"):
    return GPTConfig(vocab_size=11, seq_len=8, n_layer=2, n_head=4, d_model=16, precision=precision)


@st.composite
def dp_layouts(draw):
    """(Layout, global batch, seed): the global batch splits into dp x micro_batches equal parts."""
    dp = draw(st.sampled_from(DP_SIZES))
    micro = draw(st.sampled_from([1, 2, 3]))
    per_micro = draw(st.sampled_from([1, 2]))       # samples per micro-batch
    layout = Layout(dp=dp, micro_batches=micro, bucket_bytes=draw(st.sampled_from(BUCKET_BYTES)),
                    overlap=draw(st.booleans()))
    return layout, dp * micro * per_micro, draw(seeds)


# ----------------------------------------------------------------------------- parity
@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
@settings(max_examples=10)
@given(setup=dp_layouts(), steps=st.sampled_from([2, 3]))
def test_dp_equals_serial_fp64(grid_of, device, algorithm, setup, steps):
    layout, global_batch, seed = setup
    lockstep(tiny_config(), layout, TASK, global_batch, steps, grid=grid_of(layout.dp, algorithm=algorithm),
             optim=OPTIM, seed=seed, tol=FP64_TOL, device=device)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_dp_equals_serial_fp32(grid_of, device, algorithm):
    """float32: the reduction order changes the rounding; parity.TOLERANCE["fp32"] bounds it.

    Adam's eps is raised to 1e-6 here. The key bias of attention has a gradient that is
    exactly zero in exact arithmetic (softmax ignores a shift of every score in a row), so in
    float32 it is pure rounding noise, ~1e-9; Adam divides it by sqrt(v) + eps, and with
    eps = 1e-8 the update of that bias amplifies the noise to ~1e-4 of the parameter."""
    dp = DP_SIZES[-1]
    layout = Layout(dp=dp, micro_batches=2, bucket_bytes=4096)
    optim = OptimConfig(lr=OPTIM.lr, weight_decay=OPTIM.weight_decay, max_norm=OPTIM.max_norm, eps=1e-6)
    lockstep(tiny_config("fp32"), layout, TASK, 2 * dp, 3, grid=grid_of(dp, algorithm=algorithm), optim=optim,
             tol=parity.TOLERANCE["fp32"], device=device)


# ----------------------------------------------------------------------------- volume
class MicroBatchStarts:
    """TASK, noting the ledger's position each time the engine draws a micro-batch (just
    before that micro-batch's forward)."""

    def __init__(self, ledger):
        self.ledger, self.starts = ledger, []
        self.seq_len, self.vocab_size = TASK.seq_len, TASK.vocab_size

    def batch(self, step, indices, split="train"):
        self.starts.append(self.ledger.snapshot())
        return TASK.batch(step, indices, split)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
@settings(max_examples=5)
@given(setup=dp_layouts())
def test_bytes_per_step_are_the_ring_formula(grid_of, device, algorithm, precision, setup):
    layout, global_batch, seed = setup
    grid = grid_of(layout.dp, algorithm=algorithm)
    n, ledger = layout.dp, grid.world.ledger
    engine = Engine(tiny_config(precision), layout, OPTIM, seed=seed, grid=grid, device=device)
    phi = engine.model.num_params()
    itemsize = np.dtype(engine.precision.param_dtype).itemsize
    task = MicroBatchStarts(ledger)
    with ledger.measure() as step:
        engine.train_step(0, task, global_batch)
    starts = task.starts
    grads = [e for e in step.entries if e.group == "dp"]   # the logged loss goes to a metrics ledger
    n_buckets = len(engine.sync.buckets) if n > 1 else 0
    expected = 2 * (n - 1) / n * phi * itemsize      # a ring all-reduce of all Phi gradients
    before_last = ledger.since(starts[0]).entries[: starts[-1] - starts[0]]
    agree(grid.world, len(starts) == layout.micro_batches and before_last == (),
          f"{len(before_last)} calls before the last of {len(starts)} micro-batches: {before_last[:3]}")
    agree(grid.world, len(grads) == n_buckets and all(e.op == "all_reduce" for e in grads),
          f"expected {n_buckets} bucket all-reduces, got {[(e.op, e.elements) for e in grads]}")
    agree(grid.world, sum(e.elements for e in grads) == phi * (n > 1)
          and sum(e.bytes for e in grads) == expected,
          f"gradient sync sent {sum(e.bytes for e in grads)} bytes for {sum(e.elements for e in grads)} "
          f"elements; 2(N-1)/N * Phi * itemsize = {expected} (N={n}, Phi={phi}, itemsize={itemsize})")


# ----------------------------------------------------------------------------- overlap
def record_launches_and_grads(engine, monkeypatch):
    """Events in the order they happen during backward: ("grad", name) after a parameter's
    gradient is final, ("launch", bucket index) when a bucket's all-reduce starts."""
    events, sync = [], engine.sync
    launch = sync.group.iall_reduce_

    def recording_launch(buffer, op="sum"):
        events.append(("launch", next(i for i, b in enumerate(sync.buckets) if b.buffer is buffer)))
        return launch(buffer, op)
    monkeypatch.setattr(sync.group, "iall_reduce_", recording_launch)
    for p in engine.params:
        p.register_post_accumulate_grad_hook(lambda p: events.append(("grad", p.name)))
    return events


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_first_all_reduce_starts_before_backward_ends(grid_of, device, algorithm, monkeypatch):
    dp = DP_SIZES[-1]
    if dp == 1:
        pytest.skip("needs at least 2 ranks")
    engine = Engine(tiny_config(), Layout(dp=dp, bucket_bytes=4096), OPTIM, grid=grid_of(dp, algorithm=algorithm),
                    device=device)
    events = record_launches_and_grads(engine, monkeypatch)
    engine.train_step(0, TASK, 2 * dp)
    group = engine.grid.world
    launches = [i for i, (kind, _) in enumerate(events) if kind == "launch"]
    last_grad = max(i for i, (kind, _) in enumerate(events) if kind == "grad")
    n_buckets = len(engine.sync.buckets)
    agree(group, n_buckets >= 3 and len(launches) == n_buckets,
          f"{n_buckets} buckets, {len(launches)} launched during backward")
    agree(group, launches[0] < last_grad,
          f"first all-reduce launched at event {launches[0]}, backward's last gradient at {last_grad}")
    launched = sorted(events[i][1] for i in launches)
    agree(group, launched == list(range(n_buckets)), f"buckets launched: {launched}")


@pytest.mark.mpi
def test_overlap_off_reduces_only_after_backward(grid_of, device, monkeypatch):
    dp = DP_SIZES[-1]
    if dp == 1:
        pytest.skip("needs at least 2 ranks")
    engine = Engine(tiny_config(), Layout(dp=dp, bucket_bytes=4096, overlap=False), OPTIM,
                    grid=grid_of(dp), device=device)
    events = record_launches_and_grads(engine, monkeypatch)
    engine.train_step(0, TASK, 2 * dp)
    agree(engine.grid.world, all(kind == "grad" for kind, _ in events),
          f"overlap=False launched during backward: {[e for e in events if e[0] == 'launch']}")


# ----------------------------------------------------------------------------- buckets (serial)
@settings(max_examples=25)
@given(bucket_bytes=st.integers(1, 20000))
def test_buckets_partition_params_greedily_in_backward_order(device, bucket_bytes):
    """Buckets cut the reversed parameter list into runs; a run closes only when the next
    parameter would overflow it; every p.grad is a view of its bucket's flat buffer."""
    model_params = Engine(tiny_config(), device=device).params
    ddp = DataParallel(model_params, Group.single(ledger=CommLedger()), bucket_bytes)
    buckets = ddp.buckets
    assert [p for b in buckets for p in b.params] == model_params[::-1]
    for b, after in zip(buckets, buckets[1:] + [None]):
        nbytes = sum(p.data.nbytes for p in b.params)
        assert b.buffer.nbytes == nbytes and (nbytes <= bucket_bytes or len(b.params) == 1)
        if after is not None:                          # greedy: the next parameter did not fit
            assert nbytes + after.params[0].data.nbytes > bucket_bytes
        for p in b.params:
            before = float(b.buffer.sum())             # p.grad is a view: writing it writes the bucket
            p.grad[...] += 1
            assert p.grad.shape == p.data.shape and float(b.buffer.sum()) == before + p.grad.size
    assert ddp.grad_volume_elements() == sum(p.data.size for p in model_params)
