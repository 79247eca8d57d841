# OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 4 .venv/bin/python -m mpi4py -m pytest -m "cp and mpi" -p no:cacheprovider -q tests/test_cp_bugzoo.py
"""The context-parallel bug zoo: classic ring-attention mistakes, each caught by parity.

Every test monkeypatches one mistake into the cp code and runs the lockstep parity
check (minipar/lockstep.py, with the setup of test_context_parallel.py) for one or two steps on 4 ranks (dp=2 x cp=2 for
the gradient-sync bug, cp=4 for the ring bugs); each must raise ParityError on every
rank (a collective verdict, so no rank is left waiting).
"""
import numpy as np
import pytest

from minipar import parity
from minipar.backend import array_module
from minipar.engine import Engine, Layout
from minipar.lockstep import lockstep
from minipar.parallel.context import online_softmax, ring_attention
from minipar.parallel.context.split import FULL, pair_kind

from helpers import CP_RUN, cp_config

pytestmark = [pytest.mark.cp, pytest.mark.mpi]


def caught(grid, device, layout, steps=1):
    with pytest.raises(parity.ParityError) as err:
        lockstep(cp_config(), layout, batch=4, steps=steps, grid=grid, device=device, **CP_RUN)
    return str(err.value)


def test_catches_wrong_log_sum_exp_merge(grid_of, device, monkeypatch):
    """Adding block outputs and keeping the larger lse forgets to rescale each block by its
    share exp(lse_b - lse) of the softmax mass."""
    def bad_merge(o, lse, o_b, lse_b):
        xp = array_module(o)
        return o + o_b, xp.maximum(lse, lse_b)
    monkeypatch.setattr(online_softmax, "merge", bad_merge)
    caught(grid_of(cp=4), device, Layout(cp=4))


def test_catches_causal_mask_applied_to_whole_blocks(grid_of, device, monkeypatch):
    """Deciding causality per block only (a diagonal block computed in full) lets each query
    see the future tokens of its own chunk."""
    monkeypatch.setattr(ring_attention, "pair_kind", lambda i, j: FULL if i == j else pair_kind(i, j))
    caught(grid_of(cp=4), device, Layout(cp=4))


def test_catches_zigzag_chunk_order_swapped(grid_of, device, monkeypatch):
    """A rank holds chunks (r, 2cp-1-r) in that order; reading a received K/V block as
    (2cp-1-r, r) masks every key with the wrong position."""
    monkeypatch.setattr(ring_attention, "block_chunks", lambda split, src: split.chunks(src)[::-1])
    caught(grid_of(cp=4), device, Layout(cp=4, cp_split="zigzag"))


def test_catches_dk_dv_not_sent_home(grid_of, device, monkeypatch):
    """Skipping the last hop leaves each rank with the dK/dV of its neighbour's block: the
    forward is right, the gradients are not."""
    monkeypatch.setattr(ring_attention, "send_home", lambda group, dkv: dkv)
    message = caught(grid_of(cp=4), device, Layout(cp=4))
    assert "grad" in message


def test_catches_gradient_averaging_over_dp_only(grid_of, device, monkeypatch):
    """cp ranks hold other tokens of the same samples: their gradients must be averaged too
    (dp x cp, as Megatron folds cp into data parallelism), not over dp alone."""
    monkeypatch.setattr(Engine, "data_parallel_group", lambda self: self.grid and self.grid.dp_group)
    caught(grid_of(2, cp=2), device, Layout(dp=2, cp=2))


def test_the_zoo_keepers_layouts_pass_without_a_bug(grid_of, device):
    """The same layouts, unpatched, pass: each failure above is the bug's, not the setup's."""
    for grid, layout in ((grid_of(cp=4), Layout(cp=4)), (grid_of(2, cp=2), Layout(dp=2, cp=2))):
        worst = lockstep(cp_config(), layout, batch=4, steps=1, grid=grid, device=device, **CP_RUN).worst
        assert np.isfinite(worst)
