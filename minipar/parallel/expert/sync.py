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

Under ZeRO each kind is sharded over its own group: one ZeRO stage (zero/stages.py,
make_zero) over dp for the dense parameters, another over edp for the expert ones (ExpertZero).
"""
from contextlib import ExitStack, contextmanager

import numpy as np

from minipar.contracts import GradientSync, ModelOptimizer
from minipar.layout import check_zero
from minipar.optim import grad_stats
from minipar.parallel.data.ddp import DataParallel
from minipar.parallel.zero.stages import make_zero


def split_params(params, experts):
    """(dense, expert) parameter lists, in the order of `params`."""
    ids = {id(p) for p in experts}
    return [p for p in params if id(p) not in ids], [p for p in params if id(p) in ids]


class ExpertDataParallel(GradientSync):
    """Two DataParallels: dense params over dp, expert params over edp (then x 1/ep).
    The engine's gradient-sync contract (contracts.GradientSync), plus grad_stats() that
    counts every entry once over the world: the engine takes the gradient statistics from
    this sync (shards_gradients) rather than from the plain optimizer."""

    shards_gradients = True     # grad_stats() counts each entry on one rank: summed over the world

    def __init__(self, params, experts, groups, bucket_bytes=2 ** 20, overlap=True):
        self.ep = groups.ep
        dense, expert = split_params(params, experts)
        self.dp_rank, self.edp_rank = groups.balance.rank, groups.edp_group.rank
        self.dense = DataParallel(dense, groups.balance, bucket_bytes, overlap)
        self.experts = DataParallel(expert, groups.edp_group, bucket_bytes, overlap)
        self.dense_params, self.expert_params = dense, expert

    def set_last_micro_batch(self, last):
        self.dense.set_last_micro_batch(last)
        self.experts.set_last_micro_batch(last)

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


class _Prefixed:
    """The memory ledger seen by the expert ZeRO stage: its names prefixed "experts:",
    so its flat buffers never collide with the dense ones' entries."""

    def __init__(self, ledger, prefix):
        self.ledger, self.prefix, self.transfers = ledger, prefix, ledger.transfers

    def add(self, name, *args, **kwargs):
        return self.ledger.add(self.prefix + name, *args, **kwargs)

    def remove(self, name):
        self.ledger.remove(self.prefix + name)

    def __contains__(self, name):
        return self.prefix + name in self.ledger

    def report(self):
        return self.ledger.report()


class ExpertZero(GradientSync, ModelOptimizer):
    """ZeRO with experts: a ZeRO stage (make_zero) over dp for the dense parameters, another over
    edp for the expert parameters (then x 1/ep, as above). Both contracts, as one ZeRO stage
    (contracts.GradientSync and ModelOptimizer), plus report().
    Stage 3 is refused: its units are Blocks, which hold both kinds."""

    shards_gradients = True

    def __init__(self, params, experts, groups, layout, optim_cfg, precision, ledger, model=None):
        check_zero(layout, experts=groups.ep * groups.per_rank)     # layout.py: no ZeRO-3 with experts
        dense, expert = split_params(params, experts)
        self.ep = groups.ep
        self.dense = make_zero(dense, groups.balance, layout, optim_cfg, precision, ledger, model)
        self.experts = None if not expert else make_zero(
            expert, groups.edp_group, layout, optim_cfg, precision, _Prefixed(ledger, "experts:"), model)
        self.parts = [z for z in (self.dense, self.experts) if z is not None]

    t = property(lambda self: self.dense.t, doc="the optimizer's step count (both parts alike)")

    def set_last_micro_batch(self, last):
        for z in self.parts:
            z.set_last_micro_batch(last)

    def zero_grad(self):
        for z in self.parts:
            z.zero_grad()

    def finish(self):
        for z in self.parts:
            z.finish()         # reduce-scatter (avg): dense over dp, experts over edp
        if self.experts is not None and self.ep > 1:
            self.experts.grad_shard *= 1.0 / self.ep

    def grad_stats(self):
        return sum(z.grad_stats() for z in self.parts)

    def step(self, grad_scale=1.0):
        for z in self.parts:
            z.step(grad_scale)  # each updates its shard, then all-gathers over its own group

    def state(self):
        out = {}
        for z in self.parts:
            out.update(z.state())
        return out

    @contextmanager
    def gathered(self):
        with ExitStack() as stack:
            for z in self.parts:
                stack.enter_context(z.gathered())
            yield self

    def load_state(self, state, t):
        """Each part keeps its own shard of {name: {"param", "master", "m", "v"}}."""
        for z in self.parts:
            z.load_state({p.name: state[p.name] for p in z.params}, t)

    def report(self):
        return self.dense.report()
