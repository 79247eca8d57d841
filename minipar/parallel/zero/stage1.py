"""ZeRO-1, P_os (Rajbhandari et al. 2020): the optimizer states cut over dp.

What stage 1 adds to stage 0's layout (stage0.py): the whole model is still one
flat buffer of parameters and one of gradients on every rank, but rank r owns
chunk r of it (partition.py) and keeps the optimizer state (master, m, v) for
that chunk only, 4Φ + 12Φ/N bytes per rank under mixed precision:

    finish()   reduce-scatter (avg) of the flat gradient: rank r gets the mean of chunk r
    step()     update chunk r, then all-gather every rank's updated chunk into the
               whole flat parameters

The two collectives are the halves of a ring all-reduce: the same 2Φ(N-1)/N per
rank and step as plain DP.
"""
from contextlib import contextmanager

import numpy as np

from minipar.parallel.zero.stage0 import Zero0


class Zero1(Zero0):
    """Whole flat parameters and gradients, my chunk of the optimizer states: reduce-scatter
    the gradient, update my chunk, all-gather the parameters."""

    stage = 1

    def _shard_group(self):
        return self.group              # what ZeRO-1 adds: the model states are cut over dp

    def _norm_mask(self):
        return self.part.owner_mask(np)      # each rank counts its own chunk: no replicas over dp

    def finish(self):
        """After backward: my chunk of the flat gradient holds its average over dp."""
        u = self.part.units[0]                 # one unit: the whole flat gradient
        self.flat_grad[u.span][u.own] = self._reduce_scatter(self.flat_grad[u.span])
        for p in self.params:                  # only my chunk is averaged: hide the stale rest
            p.grad = None

    def _put_params(self, own, new):
        super()._put_params(own, new)          # my updated chunk into my flat parameters
        if self.shard_group is not None:
            self.gather_params()

    def gather_params(self):
        """Every rank's updated chunks into every rank's whole flat parameters."""
        for u in self.part.units:
            # all-gather over dp: my updated chunk (padded/N) in, the unit's parameters (padded,) out
            self.flat_param[u.span] = self._all_gather(self.flat_param[u.span][u.own])

    @contextmanager
    def gathered(self):
        """For inspection: inside, every p.grad is the whole averaged gradient, as under plain
        DP (all-gathered over dp); released on exit."""
        grads = self._gathered_views(self.grad_shard)
        for p in self.params:
            p.grad = grads[p.name]
        try:
            yield self
        finally:
            for p in self.params:
                p.grad = None
