"""Gradient sync with experts: dense parameters over dp, expert parameters over edp.

Rank d's loss is the mean over its own tokens, and data parallelism averages:
g = (1/dp) sum_d grad L_d. A dense parameter gets that from an all-reduce (avg) over dp.
An expert held by ep rank j received the tokens of the whole ep group, so after its
backward it holds sum_{d in my ep group} grad_e L_d; the dp/ep ranks of its edp group hold
the same expert for the other ep groups. The right gradient is therefore

    g_e = (1/dp) sum_d grad_e L_d = (1/ep) * avg over edp of (my ep group's sum)

all-reduce (avg) over edp, then a 1/ep scale (exact for powers of two). Averaging expert
gradients over the full dp group instead would mix different experts (ep ranks hold
different ones): a classic mistake, in the bug zoo.

Under ZeRO each kind is sharded over its own group: ZeroOptimizer over dp for the dense
parameters, ZeroOptimizer over edp for the expert ones (ExpertZero).
"""
from contextlib import ExitStack, contextmanager

import numpy as np

from minipar.optim import grad_stats
from minipar.parallel.data_parallel import DataParallel


def split_params(params, experts):
    """(dense, expert) parameter lists, in the order of `params`."""
    ids = {id(p) for p in experts}
    return [p for p in params if id(p) not in ids], [p for p in params if id(p) in ids]


class ExpertDataParallel:
    """Two DataParallels: dense params over dp, expert params over edp (then x 1/ep).
    The engine's gradient-sync contract: zero_grad(), `sync` (last micro-batch), finish(),
    plus grad_stats() that counts every entry once over the world."""

    def __init__(self, params, experts, groups, bucket_bytes=2 ** 20, overlap=True):
        self.ep = groups.ep
        dense, expert = split_params(params, experts)
        self.dp_rank, self.edp_rank = groups.balance.rank, groups.edp_group.rank
        self.dense = DataParallel(dense, groups.balance, bucket_bytes, overlap)
        self.experts = DataParallel(expert, groups.edp_group, bucket_bytes, overlap)
        self.dense_params, self.expert_params = dense, expert

    @property
    def sync(self):
        return self.dense.sync

    @sync.setter
    def sync(self, value):
        self.dense.sync = self.experts.sync = value

    def zero_grad(self):
        self.dense.zero_grad()
        self.experts.zero_grad()

    def finish(self):
        self.dense.finish()          # all-reduce (avg) over dp, bucket by bucket
        self.experts.finish()        # all-reduce (avg) over edp, bucket by bucket
        if self.ep > 1:
            for b in self.experts.buckets:
                b.buffer *= 1.0 / self.ep

    def grad_stats(self):
        """[sum g^2, #non-finite] of the entries this rank counts: dense ones on dp rank 0, expert
        ones on edp rank 0 (and only where norm_owner), so a sum over the world counts each once."""
        mine = (self.dense_params if self.dp_rank == 0 else []) + \
               (self.expert_params if self.edp_rank == 0 else [])
        return grad_stats(mine) if mine else np.zeros(2)
