"""Bug zoo for tensor parallelism: classic Megatron mistakes, patched in, must be caught.

Each bug (monkeypatch, undone after the test) is a mistake people really make; the
lockstep parity check (minipar/lockstep.py, as in tests/test_tensor_parallel.py) must raise ParityError on
every rank. The control test runs the very same setup without the bug and passes.

    f_backward_without_all_reduce   f's backward returns the local dL/dx: every layer norm
                                    and everything upstream sees 1/tp of its gradient
    g_backward_with_extra_all_reduce  g's backward all-reduces an already replicated grad:
                                    tp times too big
    heads_cut_across_head_dim       c_attn cut along each head's q|k|v columns instead of
                                    by whole heads: the same shapes, but every rank mixes
                                    pieces of all heads
    loss_without_global_max         the vocab-parallel loss skips the max subtraction; fine
                                    in exact arithmetic, exp overflows with large logits
                                    (wte scaled up 1e4 in both runs)
    attention_dropout_not_cut_by_head  every rank uses the FIRST heads' attention masks
                                    (a seed shared where it must differ)
    sp_layer_norm_grads_not_summed  sequence parallel: LayerNorm, wpe and bias grads stay
                                    partial sums over this rank's T chunk
    replicas_counted_tp_times_in_norm  norm_owner forgotten: the global grad norm counts
                                    every replicated parameter tp times (the clip is off)
"""
import numpy as np
import pytest

from minipar.backend import array_module
from minipar import parity
from minipar.comm.group import Group
from minipar.engine import Layout
from minipar.lockstep import lockstep
from minipar.parallel.tensor import megatron as tensor_parallel, sequence as sequence_parallel, vocab as vocab_parallel

from helpers import TP_RUN, tp_config

pytestmark = [pytest.mark.mpi, pytest.mark.tp]

WORLD = Group.world().size
TP = 2 if WORLD >= 2 else 1       # head_dim 4 = 3*4/2 columns per rank per head for the D-axis bug


# ----------------------------------------------------------------------------- the bugs
def f_backward_without_all_reduce(monkeypatch):
    """BUG: f's backward forgets the all-reduce."""
    monkeypatch.setattr(tensor_parallel.CopyToTP, "backward", staticmethod(lambda ctx, grad: grad))


def g_backward_with_extra_all_reduce(monkeypatch):
    """BUG: g's backward all-reduces too (it is the identity)."""
    def backward(ctx, grad):
        return ctx.group.all_reduce(grad)      # all-reduce (sum) over tp of an identical grad: x tp

    def forward(ctx, x, group):
        ctx.group = group
        return group.all_reduce(x)             # all-reduce (sum) over tp of the partial outputs
    monkeypatch.setattr(tensor_parallel.ReduceFromTP, "forward", staticmethod(forward))
    monkeypatch.setattr(tensor_parallel.ReduceFromTP, "backward", staticmethod(backward))


def heads_cut_across_head_dim(monkeypatch):
    """BUG: cuts the last axis of (..., H, 3D), the columns inside each head, not the head axis."""
    def split_within_heads(w, n_head, group):
        heads = w.reshape(*w.shape[:-1], n_head, -1)                  # (..., H, 3D)
        k = heads.shape[-1] // group.size
        mine = heads[..., group.rank * k:(group.rank + 1) * k]        # (..., H, 3D/tp): wrong axis
        return mine.reshape(*w.shape[:-1], -1).copy()                 # (..., H*3D/tp)
    monkeypatch.setattr(tensor_parallel, "split_heads", split_within_heads)


def loss_without_global_max(monkeypatch):
    """BUG: no max subtracted before exp (m = 0)."""
    monkeypatch.setattr(vocab_parallel, "global_max",
                        lambda z, group: array_module(z).zeros(z.shape[0], z.dtype))


def attention_dropout_not_cut_by_head(monkeypatch):
    """BUG: every rank draws the masks of heads 0 .. H/tp-1 (patched in after sharding)."""
    shard = tensor_parallel.parallel_attention

    def first_heads(attn, group, sequence_parallel):
        attn = shard(attn, group, sequence_parallel)
        attn.head_slice = slice(0, attn.n_head)
        return attn
    monkeypatch.setattr(tensor_parallel, "parallel_attention", first_heads)


def sp_grads_not_summed(monkeypatch):
    """BUG: sequence parallel replicated weights keep the partial grad of this rank's T chunk."""
    monkeypatch.setattr(sequence_parallel.SumWeightGrads, "backward",
                        staticmethod(lambda ctx, grad: ctx.op.backward(ctx, grad)))


def replicas_counted_tp_times(monkeypatch):
    """BUG: every rank claims its replicated parameters for the global gradient norm
    (mark_replicas leaves spec.norm_owner True on every tp rank)."""
    monkeypatch.setattr(tensor_parallel, "mark_replicas", lambda model, group: None)


def scale_wte(step, local, serial):
    """Before the first step, large logits (|z| ~ 1e3): exp(z) overflows unless the max is
    subtracted first."""
    if step == 0:
        for engine in (local, serial):
            engine.model.wte.weight.data *= 1e4


# name: (bug, config overrides, sequence parallel, hook before each step)
BUGS = {
    "f_backward_without_all_reduce": (f_backward_without_all_reduce, {}, False, None),
    "g_backward_with_extra_all_reduce": (g_backward_with_extra_all_reduce, {}, False, None),
    "heads_cut_across_head_dim": (heads_cut_across_head_dim, dict(n_head=4, d_model=16), False, None),
    "loss_without_global_max": (loss_without_global_max, {}, False, scale_wte),
    "attention_dropout_not_cut_by_head": (attention_dropout_not_cut_by_head, dict(dropout=0.2), False, None),
    "sp_layer_norm_grads_not_summed": (sp_grads_not_summed, {}, True, None),
    "replicas_counted_tp_times_in_norm": (replicas_counted_tp_times, {}, False, None),
}


@pytest.fixture(scope="module")
def grid(grid_of):
    if WORLD < 2:
        pytest.skip("tensor parallelism needs at least 2 ranks")
    return grid_of(tp=TP)


def run(grid, device, bug):
    _, overrides, sp, before_step = BUGS[bug]
    layout = Layout(tp=TP, sequence_parallel=sp, micro_batches=2)
    return lockstep(tp_config(TP, **overrides), layout, steps=2, grid=grid, before_step=before_step,
                    device=device, **TP_RUN)


@pytest.mark.parametrize("bug", BUGS)
def test_correct_tensor_parallelism_passes_the_same_check(grid, device, bug):
    run(grid, device, bug)


def caught(grid, device, monkeypatch, bug):
    """Plant `bug`, run the control's check: it must raise ParityError (on every rank)."""
    BUGS[bug][0](monkeypatch)
    with pytest.raises(parity.ParityError, match="parity failed") as caught, np.errstate(over="ignore",
                                                                                          invalid="ignore"):
        run(grid, device, bug)                                       # raised on every rank
    if grid.world.rank == 0:
        print(f"\n  {bug}: {caught.value}")


def test_catches_f_backward_without_all_reduce(grid, device, monkeypatch):
    caught(grid, device, monkeypatch, "f_backward_without_all_reduce")


def test_catches_g_backward_with_extra_all_reduce(grid, device, monkeypatch):
    caught(grid, device, monkeypatch, "g_backward_with_extra_all_reduce")


def test_catches_heads_cut_across_head_dim(grid, device, monkeypatch):
    caught(grid, device, monkeypatch, "heads_cut_across_head_dim")


def test_catches_loss_without_global_max(grid, device, monkeypatch):
    caught(grid, device, monkeypatch, "loss_without_global_max")


def test_catches_attention_dropout_not_cut_by_head(grid, device, monkeypatch):
    caught(grid, device, monkeypatch, "attention_dropout_not_cut_by_head")


def test_catches_sp_layer_norm_grads_not_summed(grid, device, monkeypatch):
    caught(grid, device, monkeypatch, "sp_layer_norm_grads_not_summed")


def test_catches_replicas_counted_tp_times_in_norm(grid, device, monkeypatch):
    caught(grid, device, monkeypatch, "replicas_counted_tp_times_in_norm")


def test_every_mistake_has_its_test():
    assert {f"test_catches_{bug}" for bug in BUGS} <= set(globals())
