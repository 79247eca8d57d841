"""Bug zoo for DDP: classic data-parallel mistakes, patched into DataParallel, must be caught.

Each bug replaces one method of DataParallel (monkeypatch, undone after the test)
with a version that makes a mistake people really make. The parity check of
tests/test_data_parallel.py must then raise ParityError on every rank:

    sum_not_mean            all-reduce SUM: the update sees N x the mean gradient
    last_bucket_forgotten   off-by-one: the last bucket (the tied embedding) is never reduced
    sums_every_micro_batch  accumulation ignores `sync`: every micro-batch all-reduces (SUM)
                            what has piled up in the bucket, so early micro-batches count N^k times
    launch_on_first_grad    a bucket is launched when its FIRST gradient is ready, before the
                            others arrived: they stay local, unaveraged
    no_sync_forgotten       the real hook without the `sync` test: the bucket launches in the
                            first micro-batch, later micro-batches add to it, nobody reduces them

One mistake is invisible to parity: averaging every micro-batch gives the right
numbers (averaging is linear) at M times the traffic. The comm ledger catches it.

Bugs that launch a bucket too early are run with the "ring" algorithm, which
reduces at the moment of launch. With MPI's Iallreduce the moment the buffer is
read depends on MPI's progress engine: the bug is a data race, and a race may
happen to give the right answer in a test.
"""
import numpy as np
import pytest

from minipar import parity
from minipar.data import ReverseTask
from minipar.comm.group import Group
from minipar.comm.request import Request
from minipar.parity import agree
from minipar.engine import Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.nn import GPTConfig
from minipar.parallel.data.ddp import DataParallel

pytestmark = [pytest.mark.mpi, pytest.mark.dp]

WORLD = Group.world().size
DP = max(n for n in (1, 2, 4, 8) if n <= WORLD and WORLD % n == 0)   # the biggest block that fits
TASK = ReverseTask(n_digits=4)
CFG = GPTConfig(vocab_size=11, seq_len=8, n_layer=2, n_head=4, d_model=16, precision="fp64")
OPTIM = OptimConfig(lr=3e-3)
SEVERAL_BUCKETS, ONE_BUCKET = 4096, 2 ** 30


# ----------------------------------------------------------------------------- the bugs
def finish_sum_not_mean(self):
    """BUG: sum_r g_r where the loss is a mean over the global batch: N times too big."""
    for b in self.buckets:
        self.group.all_reduce_(b.buffer, op="sum")    # all-reduce (sum) of one bucket over dp


def finish_last_bucket_forgotten(self):
    """BUG: off-by-one, the last bucket (wte, the tied embedding: its grad is final last) is skipped."""
    for b in self.buckets[:-1]:
        self.group.all_reduce_(b.buffer, op="avg")    # all-reduce (avg) of one bucket over dp


def hook_sums_every_micro_batch(self, p):
    """BUG: ignores `self.sync`, so each micro-batch sums the bucket over the ranks, including
    what earlier micro-batches left in it (already summed): wrong scale, N^k for micro-batch k."""
    b = self.bucket_of[id(p)]
    b.ready += 1
    if b.ready == len(b.params):
        self.group.all_reduce_(b.buffer, op="sum")    # all-reduce (sum) of one bucket over dp
        b.ready, b.request = 0, Request()             # done: finish() only waits


def hook_averages_every_micro_batch(self, p):
    """Not wrong, wasteful: averaging is linear, so re-averaging the accumulated bucket each
    micro-batch gives the right gradient, for M times the bytes."""
    b = self.bucket_of[id(p)]
    b.ready += 1
    if b.ready == len(b.params):
        self.group.all_reduce_(b.buffer, op="avg")    # all-reduce (avg) of one bucket over dp
        b.ready, b.request = 0, Request()             # done: finish() only waits


def hook_launch_on_first_grad(self, p):
    """BUG: launches the bucket as soon as ONE of its gradients is ready."""
    if not self.sync:
        return
    b = self.bucket_of[id(p)]
    b.ready += 1
    if b.ready == 1:
        b.request = self.group.iall_reduce_(b.buffer, op="avg")   # all-reduce (avg) of the bucket


def hook_no_sync_forgotten(self, p):
    """BUG: the real hook minus `if not self.sync`: launches during the first micro-batch."""
    if self.group.size == 1:
        return
    b = self.bucket_of[id(p)]
    b.ready += 1
    if b.ready == len(b.params):
        b.request = self.group.iall_reduce_(b.buffer, op="avg")   # all-reduce (avg) of the bucket


# name: (method patched, its buggy version, layout, algorithms it is caught under)
BUGS = {
    "sum_not_mean": ("finish", finish_sum_not_mean,
                     Layout(dp=DP, bucket_bytes=SEVERAL_BUCKETS, overlap=False), ["mpi", "ring"]),
    "last_bucket_forgotten": ("finish", finish_last_bucket_forgotten,
                              Layout(dp=DP, bucket_bytes=SEVERAL_BUCKETS, overlap=False), ["mpi", "ring"]),
    "sums_every_micro_batch": ("_on_grad_ready", hook_sums_every_micro_batch,
                               Layout(dp=DP, micro_batches=2, bucket_bytes=SEVERAL_BUCKETS), ["mpi", "ring"]),
    "launch_on_first_grad": ("_on_grad_ready", hook_launch_on_first_grad,
                             Layout(dp=DP, bucket_bytes=ONE_BUCKET), ["ring"]),
    "no_sync_forgotten": ("_on_grad_ready", hook_no_sync_forgotten,
                          Layout(dp=DP, micro_batches=2, bucket_bytes=SEVERAL_BUCKETS), ["ring"]),
}
CASES = [(bug, algorithm) for bug, (*_, algorithms) in BUGS.items() for algorithm in algorithms]


# ----------------------------------------------------------------------------- harness
def train_and_check(grid_of, device, algorithm, layout, steps=2):
    """k steps of serial and DP Engines in lockstep (minipar/lockstep.py), parity.check after
    each; returns the DP engine."""
    return lockstep(CFG, layout, TASK, 2 * layout.dp * layout.micro_batches, steps,
                    grid=grid_of(DP, algorithm=algorithm), optim=OPTIM, tol=1e-11, device=device).local


def needs_ranks():
    if DP == 1:
        pytest.skip("data parallelism needs at least 2 ranks")


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("bug,algorithm", CASES)
def test_correct_ddp_passes_the_same_check(grid_of, device, bug, algorithm):
    """The control: without the bug, the very same layout and check pass."""
    needs_ranks()
    train_and_check(grid_of, device, algorithm, BUGS[bug][2])


def caught(grid_of, device, monkeypatch, bug, algorithm):
    """Plant `bug`, run the control's check: it must raise ParityError (on every rank)."""
    needs_ranks()
    method, buggy, layout, _ = BUGS[bug]
    monkeypatch.setattr(DataParallel, method, buggy)
    with pytest.raises(parity.ParityError, match="parity failed"):   # raised on every rank
        train_and_check(grid_of, device, algorithm, layout)


@pytest.mark.parametrize("algorithm", BUGS["sum_not_mean"][3])
def test_catches_sum_not_mean(grid_of, device, monkeypatch, algorithm):
    caught(grid_of, device, monkeypatch, "sum_not_mean", algorithm)


@pytest.mark.parametrize("algorithm", BUGS["last_bucket_forgotten"][3])
def test_catches_last_bucket_forgotten(grid_of, device, monkeypatch, algorithm):
    caught(grid_of, device, monkeypatch, "last_bucket_forgotten", algorithm)


@pytest.mark.parametrize("algorithm", BUGS["sums_every_micro_batch"][3])
def test_catches_sums_every_micro_batch(grid_of, device, monkeypatch, algorithm):
    caught(grid_of, device, monkeypatch, "sums_every_micro_batch", algorithm)


@pytest.mark.parametrize("algorithm", BUGS["launch_on_first_grad"][3])
def test_catches_launch_on_first_grad(grid_of, device, monkeypatch, algorithm):
    caught(grid_of, device, monkeypatch, "launch_on_first_grad", algorithm)


@pytest.mark.parametrize("algorithm", BUGS["no_sync_forgotten"][3])
def test_catches_no_sync_forgotten(grid_of, device, monkeypatch, algorithm):
    caught(grid_of, device, monkeypatch, "no_sync_forgotten", algorithm)


def test_every_mistake_has_its_test():
    assert {f"test_catches_{bug}" for bug in BUGS} <= set(globals())


@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_catches_averaging_every_micro_batch_with_the_ledger_not_parity(grid_of, device, monkeypatch, algorithm):
    needs_ranks()
    monkeypatch.setattr(DataParallel, "_on_grad_ready", hook_averages_every_micro_batch)
    grid, micro = grid_of(DP, algorithm=algorithm), 3
    local = train_and_check(grid_of, device, algorithm, Layout(dp=DP, micro_batches=micro, bucket_bytes=SEVERAL_BUCKETS))
    with grid.world.ledger.measure() as step:
        local.train_step(2, TASK, 2 * DP * micro)
    sent = step.total_bytes(group="dp")
    budget = 2 * (DP - 1) * local.model.num_params() * np.dtype(np.float64).itemsize / DP   # 2(N-1)/N Phi
    agree(grid.world, sent == micro * budget, f"sent {sent} bytes, expected {micro} x {budget}")
    agree(grid.world, sent > budget, "the ledger would not catch this bug")
