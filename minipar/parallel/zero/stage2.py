"""ZeRO-2, P_os+g (Rajbhandari et al. 2020): the gradients cut over dp too.

What stage 2 adds to stage 1 (stage1.py): no rank keeps the whole flat gradient.
Its units are the gradient buckets, in backward order (partition.unit_groups);
each parameter's post-accumulate hook counts the gradients of its bucket that are
final, and on the last micro-batch's backward the bucket that completes is
reduce-scattered (avg) into this rank's gradient shard (S,) and its full
gradients are freed, so at most a bucket or so of full gradients is alive:
2Φ + 14Φ/N bytes per rank under mixed precision. During gradient accumulation
(earlier micro-batches) the full gradients accumulate as usual; finish()
reduce-scatters whatever backward did not. The parameters stay whole, updated
chunk by chunk and all-gathered after the step, as in stage 1.
"""
from minipar.parallel.zero.partition import register
from minipar.parallel.zero.stage1 import Zero1


class Zero2(Zero1):
    """Stage 1 with my shard of the gradients only: each bucket reduce-scattered in backward."""

    stage = 2

    def _place_grads(self, flat):
        self.flat_grad = None                                            # no whole flat gradient
        self.grad_shard = self.xp.zeros(self.part.shard_size, flat.dtype)   # (S,) my chunk of each unit
        register(self.ledger, "grad:shard", self.grad_shard, "grad", self.part.shard_pad)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def zero_grad(self):
        """Zero my gradient shard; every p.grad starts unset (autograd allocates it)."""
        self.sync = False
        for u in self.part.units:
            u.ready = 0
        self.grad_shard[...] = 0
        for p in self.params:
            p.grad = None

    def _on_grad(self, p):
        """Post-accumulate hook: a full gradient, alive until reduced; on the last micro-batch
        (sync), reduce-scatter its unit once all of the unit's gradients are final."""
        self.ledger.add(f"grad:{p.name}", p.grad, "grad")
        if self.sync:
            self._count(p)

    def _count(self, p):
        """One more final gradient of p's unit: reduce the unit when it has them all."""
        unit = self.part.unit_of[id(p)]
        unit.ready += 1
        if unit.ready == len(unit.params):
            self._reduce_unit(unit)

    def _reduce_unit(self, unit):
        """reduce-scatter one unit's gradients into my grad shard, then free them."""
        grads = unit.pack([p.grad for p in unit.params], self.xp, self.grad_shard.dtype)   # (padded,)
        self.grad_shard[unit.shard] += self._reduce_scatter(grads)
        for p in unit.params:
            p.grad = None
            if f"grad:{p.name}" in self.ledger:
                self.ledger.remove(f"grad:{p.name}")
        unit.ready = 0

    def finish(self):
        """After backward: my grad shard holds the average over dp of my chunk of every gradient."""
        for u in self.part.units:              # whatever backward did not reduce (sync was False)
            if any(p.grad is not None for p in u.params):
                self._reduce_unit(u)
