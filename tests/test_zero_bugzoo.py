"""Bug zoo for ZeRO: each classic mistake, monkeypatched in, must fail a check.

A parity check that cannot fail proves nothing. Each test plants one bug in
zero/base.py, stage1.py, stage2.py, stage3.py, partition.py or shard_optimizer.py (each
patch on the class that owns the code), trains a few fp64 steps next to the serial
run and asserts that `parity.check` raises ParityError on every rank. The
clipping-norm bugs leave every gradient right and are named by the gradient-norm row
that the lockstep check (minipar/lockstep.py) makes after every step. The last bug computes the right numbers and wastes memory: the tracemalloc
cross-check of the memory ledger must catch that one.
"""
import pytest

from minipar import ops
from minipar.parity import agree
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.parallel.zero import partition as flat
from minipar.parallel.zero.base import ZeroBase
from minipar.parallel.zero.shard_optimizer import ShardOptimizer
from minipar.parallel.zero.stage1 import Zero1
from minipar.parallel.zero.stage2 import Zero2
from minipar.parallel.zero.stage3 import Regather
from minipar.parity import ParityError

from helpers import TASK, alive_beyond_activations, zero_config, zero_engine, zero_run

pytestmark = [pytest.mark.mpi, pytest.mark.zero]


def must_fail(grid, device, layout, where, match="parity failed", optim=None, **kw):
    with pytest.raises(ParityError, match=match) as caught:
        lockstep(zero_config(**kw), layout, batch=2 * layout.dp, steps=2, grid=grid, device=device,
                 **zero_run(optim))
    if grid.world.rank == 0:
        print(f"\n  {where}: {caught.value}")           # what a student sees (pytest -s)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_catches_shard_boundary_off_by_one(grid_of, device, monkeypatch, stage):
    """Ranks > 0 start their chunk one entry early: they update entries the collectives
    (block r of every reduce-scatter / all-gather) give to their left neighbour."""
    monkeypatch.setattr(flat, "chunk_bounds",
                        lambda rank, chunk: slice(rank * chunk - (rank > 0), (rank + 1) * chunk - (rank > 0)))
    must_fail(grid_of(2), device, Layout(dp=2, zero=stage), "off by one")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_catches_gradients_summed_not_averaged(grid_of, device, monkeypatch, stage):
    """reduce-scatter with op="sum": the shard update sees N times the gradient (Adam's update
    hardly changes, but m and v are N and N^2 times too large)."""
    def summed(self, buffer):
        return buffer if self.shard_group is None else self.shard_group.reduce_scatter(buffer, op="sum")
    monkeypatch.setattr(ZeroBase, "_reduce_scatter", summed)    # every stage's collective
    must_fail(grid_of(2), device, Layout(dp=2, zero=stage), "sum, not mean")


@pytest.mark.parametrize("stage", [1, 2])
def test_catches_parameters_not_gathered_after_the_step(grid_of, device, monkeypatch, stage):
    """Each rank updates its shard but never all-gathers: the rest of its copy goes stale."""
    monkeypatch.setattr(Zero1, "gather_params", lambda self: None)     # Zero2 inherits it
    must_fail(grid_of(2), device, Layout(dp=2, zero=stage), "no all-gather")


def test_catches_adam_step_counter_advanced_per_bucket(grid_of, device, monkeypatch):
    """The step t of Adam's bias correction (1 - beta^t) counted once per bucket, not per step."""
    step = Zero2.step

    def per_bucket(self, grad_scale=1.0):
        self.t += len(self.part.units) - 1
        step(self, grad_scale)
    monkeypatch.setattr(Zero2, "step", per_bucket)
    must_fail(grid_of(2), device, Layout(dp=2, zero=2, bucket_bytes=2000), "t per bucket")


def test_catches_stage3_parameters_released_before_their_backward(grid_of, device, monkeypatch):
    """No re-gather before a unit's backward: its Functions read the released placeholders."""
    monkeypatch.setattr(Regather, "backward", staticmethod(lambda ctx, grad: grad))
    must_fail(grid_of(2), device, Layout(dp=2, zero=3), "no re-gather")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_catches_the_clipping_norm_not_reduced_over_dp(grid_of, device, monkeypatch, stage):
    """Each rank clips with the norm of its own gradient shard (the stats summed over the plain
    DDP group, mp, where ZeRO needs all of dp): every gradient agrees, the clip factor does not.
    The per-step grad-norm row names it before the parameters drift."""
    monkeypatch.setattr(Engine, "reduce_grad_stats", lambda self, stats: stats)
    must_fail(grid_of(2), device, Layout(dp=2, zero=stage), "clip norm not over dp",
              match="every gradient agrees but the global gradient norm does not",
              optim=OptimConfig(max_norm=0.05))


@getattr(pytest.mark, "3d")
def test_catches_replicas_counted_twice_in_the_clipping_norm(grid_of, device, monkeypatch):
    """With TP, LayerNorm weights are replicated on the tp ranks: a shard that ignores
    norm_owner counts them twice in ||g||, and the clip factor is wrong."""
    monkeypatch.setattr(flat.Partition, "owner_mask", lambda self, xp: xp.ones(self.shard_size, bool))
    must_fail(grid_of(2, tp=2), device, Layout(dp=2, tp=2, zero=1), "norm double count",
              match="global gradient norm does not", optim=OptimConfig(max_norm=0.05), n_head=4, d_model=8, vocab_size=12)


@pytest.mark.offload
def test_catches_offload_updated_shard_never_copied_back(grid_of, device, monkeypatch):
    """ZeRO-Offload steps on the host but the device keeps the old parameters."""
    step = ShardOptimizer.step

    def stale(self, weights, grads, grad_scale, t):
        old = weights.copy()
        step(self, weights, grads, grad_scale, t)
        return old
    monkeypatch.setattr(ShardOptimizer, "step", stale)
    must_fail(grid_of(2), device, Layout(dp=2, zero=2, offload=True), "no host -> device copy")


def test_catches_a_function_keeping_a_weight_array_alive_under_stage3(grid_of, device, monkeypatch):
    """The trap parity cannot see: a Linear that keeps its weight *array* for backward holds every
    gathered Block alive after ZeRO-3 "released" it. The values are right; tracemalloc catches it."""
    forward = ops.Linear.forward

    def keeps_weight(ctx, x, w, b=None, transpose=False):
        ctx.kept = w
        return forward(ctx, x, w, b, transpose)
    monkeypatch.setattr(ops.Linear, "forward", staticmethod(keeps_weight))
    engine = zero_engine(grid_of(2), Layout(dp=2, zero=3), device, d_model=48, n_head=4)
    engine.train_step(0, TASK, 4)
    extra, block = alive_beyond_activations(engine)
    agree(engine.grid.dp_group, extra > block, f"the leak went unseen: {extra} bytes, one Block {block}")
