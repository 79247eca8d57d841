"""ZeRO-3, P_os+g+p (Rajbhandari et al. 2020): the parameters cut over dp too.

What stage 3 adds to stage 2 (stage2.py): a rank keeps only its shard of the
parameters (S,), 16Φ/N bytes of model states under mixed precision, and
materialises a unit's parameters just while they are used. Its units are the
gathering granularity: one per Block, gathered by the Block's forward pre-hook
and released by its post-hook, plus a root unit (wte, wpe, ln_f, lm_head)
hooked on the GPT module itself, so it stays gathered for the whole forward:
that is how the tied wte, used first by the embedding and last by the head, is
handled. The post-hook wraps the unit's output in `Regather`, an identity whose
backward all-gathers the unit again before its Functions read the weights (they
read the leaf Tensor's data at backward time). A unit's gradients are
reduce-scattered and its parameters released when every one of its parameters'
post-accumulate hooks has fired: autograd sums a tied leaf's contributions
before its one hook call, and this also works for the root, whose input (token
ids) carries no gradient for an input-side identity to see. A released
parameter is a read-only zero-stride array of its shape (one element of
memory), so a missing gather shows up as a parity failure.

Stage 3 cannot keep full gradients between micro-batches, so it reduce-scatters
after every backward and sums into its shard: per micro-batch it gathers the
parameters twice (forward and backward) and reduce-scatters once, 3Φ(N-1)/N.
"""
from contextlib import contextmanager

from minipar.autograd import Function, Tensor
from minipar.parallel.zero.partition import register, unregister
from minipar.parallel.zero.stage2 import Zero2


class Regather(Function):
    """ZeRO-3's pre-backward hook: identity forward; backward all-gathers `unit` first."""

    @staticmethod
    def forward(ctx, x, zero, unit):
        ctx.zero, ctx.unit = zero, unit
        return x

    @staticmethod
    def backward(ctx, grad):
        ctx.zero.gather(ctx.unit)
        return grad


class Zero3(Zero2):
    """Stage 2 with my shard of the parameters only: each unit gathered around its forward and
    its backward, and released after."""

    stage = 3

    def __init__(self, params, dp_group, layout, optim_cfg, precision, ledger, model=None):
        super().__init__(params, dp_group, layout, optim_cfg, precision, ledger, model)
        self._hook(model, self.part.units[0])             # the root unit, for the whole forward
        for block, unit in zip(model.blocks, self.part.units[1:]):
            self._hook(block, unit)

    # ---- the parameters: my shard only ----------------------------------------------------------
    def _place_params(self, flat):
        self.flat_param = None                                           # no whole flat parameters
        self.param_shard = self.part.shard_of(flat).copy()               # (S,)
        for u in self.part.units:
            self.release(u)
        register(self.ledger, "param:shard", self.param_shard, "param", self.part.shard_pad)

    def _own_params(self):
        return self.param_shard

    def _put_params(self, own, new):
        if new is not own:                     # a master copy, or offload's copy from the host
            self.param_shard[...] = new        # keep the shard: the next forward gathers it

    def _load_params(self, flat):
        self.param_shard[...] = self.part.shard_of(flat)                 # (S,)

    # ---- the gradients: reduced after every micro-batch -----------------------------------------
    def _on_grad(self, p):
        """Post-accumulate hook: unlike stage 2, reduce-scatter a unit once all its gradients are
        final in every micro-batch's backward, accumulating into the shard."""
        self.ledger.add(f"grad:{p.name}", p.grad, "grad")    # a full gradient, alive until reduced
        self._count(p)

    def _reduce_unit(self, unit):
        """Stage 2's reduce-scatter of the unit's gradients, then release its parameters."""
        super()._reduce_unit(unit)
        self.release(unit)

    # ---- gather and release around each unit ----------------------------------------------------
    def gather(self, unit):
        """All-gather a unit's parameters into full arrays (before its forward and its backward)."""
        if unit.gathered:
            return
        # all-gather over dp: my chunk of the unit's parameters in, (padded,) out
        full = self._all_gather(self.param_shard[unit.shard])
        for p, view in zip(unit.params, unit.views(full)):
            p.data = view
        unit.gathered = True
        if self.shard_group is not None:
            register(self.ledger, f"param:gathered:{unit.name}", full, "param", unit.padded - unit.numel)

    def release(self, unit):
        """Free a unit's full parameters: each becomes a read-only zero-stride placeholder."""
        for p in unit.params:
            p.data = self.xp.broadcast_to(self.xp.zeros((), p.data.dtype), p.data.shape)
        if unit.gathered and self.shard_group is not None:
            unregister(self.ledger, f"param:gathered:{unit.name}")
        unit.gathered = False

    def _hook(self, module, unit):
        """Gather `unit` before module's forward, release it after, gather it again for backward."""
        def pre(module, args):
            self.gather(unit)

        def post(module, args, out):
            self.release(unit)
            if isinstance(out, Tensor) and out.requires_grad:
                return Regather.apply(out, zero=self, unit=unit)
            return None
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    @contextmanager
    def gathered(self):
        """For inspection: inside, every p.data and p.grad is whole on every rank, as under plain
        DP (all-gathered over dp); both are released on exit."""
        for u in self.part.units:
            self.gather(u)
        try:
            with super().gathered():           # the gradients, as in stages 1 and 2
                yield self
        finally:
            for u in self.part.units:
                self.release(u)
