# OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 4 .venv/bin/python -m mpi4py -m pytest -m mpi -p no:cacheprovider -q tests/test_ep_bugzoo.py
"""The expert-parallel bug zoo: classic mistakes, monkeypatched in, each caught by parity.

Every mistake is patched into the expert-parallel code only (ExpertParallelMoE, the expert
groups), never into the serial MoE, so the serial Engine stays the oracle. Layout: dp = 4,
ep = 2, E = 8, k = 2: each rank holds 4 experts and receives rows from 2 sources.
"""
import numpy as np
import pytest

from minipar import parity
from minipar.engine import Layout
from minipar.lockstep import lockstep
from minipar.parallel.expert.dispatch import ExpertParallelMoE
from minipar.parallel.expert.groups import ExpertGroups

from helpers import EP_RUN, ep_config

pytestmark = [pytest.mark.mpi, pytest.mark.ep]


def run(grid_of, device):
    """lockstep (minipar/lockstep.py) of the zoo's layout and its serial oracle."""
    return lockstep(ep_config(experts=8, k=2), Layout(dp=4, ep=2), batch=8, grid=grid_of(4), device=device,
                    **EP_RUN)


def test_the_zoo_layout_passes_without_a_bug(grid_of, device):
    assert run(grid_of, device).worst < parity.TOLERANCE["fp64"]


def test_catches_combine_order_mismatched_with_dispatch(grid_of, device, monkeypatch):
    """Combine sends the expert outputs back in expert-major order, not in the source-major
    order the dispatch delivered them: each source gets other tokens' rows."""
    monkeypatch.setattr(ExpertParallelMoE, "source_order", staticmethod(lambda perm: np.arange(perm.size)))
    with pytest.raises(parity.ParityError):
        run(grid_of, device)


def test_catches_expert_grads_averaged_over_full_dp(grid_of, device, monkeypatch):
    """Expert gradients all-reduced over the whole dp group (it mixes different experts of the
    ep ranks) instead of over the expert-data-parallel group."""
    init = ExpertGroups.__init__

    def full_dp(self, dp_group, ep, experts, tp_rank=0):
        init(self, dp_group, ep, experts, tp_rank)
        self.edp_group = dp_group
    monkeypatch.setattr(ExpertGroups, "__init__", full_dp)
    with pytest.raises(parity.ParityError, match="mlp.(w|b)_"):
        run(grid_of, device)


def test_catches_aux_loss_on_local_tokens_only(grid_of, device, monkeypatch):
    """f_i from this rank's routing counts instead of the global batch's (no all-gather)."""
    monkeypatch.setattr(ExpertParallelMoE, "gather_counts", lambda self, counts: counts[None])
    with pytest.raises(parity.ParityError):
        run(grid_of, device)


def test_catches_gates_not_renormalised(grid_of, device, monkeypatch):
    """The top-k probabilities used as gates as they are, not renormalised to sum to 1."""
    monkeypatch.setattr(ExpertParallelMoE, "renormalise", lambda self, top: top)
    with pytest.raises(parity.ParityError):
        run(grid_of, device)
