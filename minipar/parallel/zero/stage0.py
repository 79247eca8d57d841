"""Stage 0: plain data parallelism through ZeRO's machinery, for ZeRO-Offload on DP.

Nothing is cut (zero=0, offload=True): every rank keeps the whole model as one
flat buffer, all-reduces the whole flat gradient after the last backward (the
2Φ(N-1)/N of a ring) and updates every parameter, with the optimizer state and
the step on the host (shard_optimizer.py, Ren et al. 2021). Its "shard" is the
whole flat buffer (S = Φ, one unit, no padding). Stage 1 (stage1.py) starts
from this layout and cuts it over dp.
"""
from contextlib import contextmanager

from minipar.parallel.zero.base import ZeroBase
from minipar.parallel.zero.partition import register


class Zero0(ZeroBase):
    """Whole flat parameters and gradients on every rank; all-reduce, then every rank updates all."""

    stage = 0

    def _shard_group(self):
        return None                    # stage 0 cuts nothing: one unit, this rank's "shard" is all of it

    def _place_params(self, flat):
        self.flat_param = flat                                           # (Φ_pad,) every parameter
        self.part.point(flat, "data")                                    # p.data: views of it
        register(self.ledger, "param:flat", flat, "param", self.part.padded - self.part.numel)

    def _place_grads(self, flat):
        self.flat_grad = self.xp.zeros_like(flat)                        # (Φ_pad,) every gradient
        self.grad_shard = self.part.shard_of(self.flat_grad)             # a view: one unit
        register(self.ledger, "grad:flat", self.flat_grad, "grad", self.part.padded - self.part.numel)

    def _own_params(self):
        return self.part.shard_of(self.flat_param)                       # (S,) a view: one unit

    def _put_params(self, own, new):
        if new is not own or not self.part.shard_is_view:   # a master copy, or chunks copied out
            self.part.scatter_shard(self.flat_param, new)

    def _load_params(self, flat):
        self.flat_param[...] = flat                                      # p.data are views of it

    def _norm_mask(self):
        # every rank holds every gradient: only dp rank 0 counts them, once over the world
        return super()._norm_mask() & (self.dp_rank == 0)

    def zero_grad(self):
        """Zero the flat gradient and point every p.grad at its slot of it."""
        self.sync = False
        self.flat_grad[...] = 0
        self.part.point(self.flat_grad, "grad")

    def finish(self):
        """After backward: every rank's flat gradient is the average over dp."""
        if self.group is not None:
            # all-reduce (avg) over dp: the whole flat gradient, Φ entries
            self.group.all_reduce_(self.flat_grad, op="avg")

    @contextmanager
    def gathered(self):
        """Every p.data and p.grad is already whole here: nothing to gather."""
        yield self
