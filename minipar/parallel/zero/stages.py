"""ZeRO stages 1, 2, 3 (Rajbhandari et al. 2020): data parallelism without the replicas.

Plain data parallelism keeps everything on each of the N ranks; with mixed
precision and Adam that is 2Φ (fp16 params) + 2Φ (fp16 grads) + KΦ (fp32
master, m, v; K = 12) = 16Φ bytes. ZeRO partitions these model states over
the data-parallel group (partition.py: flat buffers, padded, rank r owns chunk r),
and each rank updates only its shard:

    stage        partitioned      bytes per rank   gradient sync                    after the step
    1  P_os      optimizer states 4Φ + 12Φ/N       reduce-scatter in finish()       all-gather params
    2  P_os+g    + gradients      2Φ + 14Φ/N       reduce-scatter each bucket in    all-gather params
                                                   backward, then free its grads
    3  P_os+g+p  + parameters     16Φ/N            gather a unit before its forward keep the shard
                                                   and its backward; reduce-scatter
                                                   its grads right after

A ring all-reduce *is* a reduce-scatter followed by an all-gather, so stages 1
and 2 send what DP sends, 2Φ(N-1)/N per rank and step; stage 3 gathers the
parameters twice (forward and backward), 3Φ(N-1)/N, 1.5x DP (Φ = Φ_pad, padded;
with M micro-batches stage 3 does all three per micro-batch: it cannot keep full
gradients, so it reduce-scatters after each backward and sums into its shard).
Stage 0 here is ZeRO-Offload on plain DP (zero=0, offload=True): gradients are
all-reduced and every rank updates all of them, on the host.

Stage 3 granularity: one unit per Block, gathered by the Block's forward
pre-hook and released by its post-hook, plus a root unit (wte, wpe, ln_f,
lm_head) hooked on the GPT module itself, so it stays gathered for the whole
forward: that is how the tied wte, used first by the embedding and last by the
head, is handled. The post-hook wraps the unit's output in `Regather`, an
identity whose backward all-gathers the unit again before its Functions read
the weights (they read the leaf Tensor's data at backward time). A unit's
gradients are reduce-scattered and its parameters released when every one of
its parameters' post-accumulate hooks has fired: autograd sums a tied leaf's
contributions before its one hook call, and this also works for the root,
whose input (token ids) carries no gradient for an input-side identity to see.
A released parameter is a read-only zero-stride array of its shape (one
element of memory), so a missing gather shows up as a parity failure.

ZeRO-3 is supported with data parallelism only (tp = pp = 1); stages 1 and 2
work on whatever local parameters TP / PP leave (over the grid's dp group).
"""
from contextlib import contextmanager

import numpy as np

from minipar.autograd import Function, Tensor
from minipar.backend import array_module
from minipar.contracts import GradientSync, ModelOptimizer
from minipar.parallel.zero.partition import Partition, register, unit_groups, unregister
from minipar.parallel.zero.shard_optimizer import ShardOptimizer


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


class ZeroOptimizer(GradientSync, ModelOptimizer):
    """Gradient sync and optimizer in one (both contracts of contracts.py): the engine calls
    zero_grad(), set_last_micro_batch() before each backward, then finish(), grad_stats(), step()."""

    shards_gradients = True        # grad_stats() covers my shard: summed over the whole world

    def __init__(self, params, dp_group, layout, optim_cfg, precision, ledger, model=None):
        self.stage, self.offload = layout.zero, layout.offload
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if self.stage == 3 and (layout.tp > 1 or layout.pp > 1):
            raise ValueError(f"ZeRO-3 is supported with data parallelism only (got tp={layout.tp}, "
                             f"pp={layout.pp}); use zero=1 or 2 with tensor or pipeline parallelism")
        self.params = [p for p in params if p.requires_grad]
        self.ledger, self.precision, self.sync, self.t = ledger, precision, False, 0
        self.n = dp_group.size if dp_group is not None else 1
        self.dp_rank = dp_group.rank if dp_group is not None else 0
        self.group = dp_group if self.n > 1 else None                 # None: nothing to communicate
        self.shard_group = self.group if self.stage >= 1 else None    # stage 0 shards nothing
        n, rank = (self.n, self.dp_rank) if self.shard_group is not None else (1, 0)
        self.part = part = Partition(unit_groups(self.params, self.stage, model, layout.bucket_bytes),
                                     n, rank)
        xp, dtype = array_module(self.params[0].data), self.params[0].data.dtype
        self.xp, flat = xp, part.flatten(xp, dtype)                 # (Φ_pad,) every parameter
        full_pad, shard_pad = part.padded - part.numel, part.shard_pad
        # parameters: a whole flat buffer (stages 0-2), or only this rank's shard (stage 3)
        self.flat_param = self.param_shard = None
        if self.stage == 3:
            self.param_shard = part.shard_of(flat).copy()                  # (S,)
            for u in part.units:
                self.release(u)
            register(ledger, "param:shard", self.param_shard, "param", shard_pad)
        else:
            self.flat_param = flat
            part.point(flat, "data")                                       # p.data: views of it
            register(ledger, "param:flat", flat, "param", full_pad)
        # gradients: a whole flat buffer (stages 0, 1), or only this rank's shard (stages 2, 3)
        if self.stage <= 1:
            self.flat_grad = xp.zeros_like(flat)
            self.grad_shard = part.shard_of(self.flat_grad)                # a view: one unit
            register(ledger, "grad:flat", self.flat_grad, "grad", full_pad)
        else:
            self.flat_grad, self.grad_shard = None, xp.zeros(part.shard_size, dtype)
            register(ledger, "grad:shard", self.grad_shard, "grad", shard_pad)
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad)
        if self.stage == 3:
            self._hook(model, part.units[0])
            for block, unit in zip(model.blocks, part.units[1:]):
                self._hook(block, unit)
        self.optim = ShardOptimizer(optim_cfg, precision, self._own_params(), ledger, shard_pad,
                                    self.offload)
        # grad_stats counts my shard's entries once over the world: stage 0's full copies on dp rank 0
        self.norm_mask = part.owner_mask(xp) & (self.stage >= 1 or self.dp_rank == 0)
        self.zero_grad()

    # ---- sizes ------------------------------------------------------------------------------------
    numel = property(lambda self: self.part.numel, doc="Φ: parameters this rank's model part has")
    numel_padded = property(lambda self: self.part.padded, doc="Φ_pad: Φ with every unit padded")
    shard_size = property(lambda self: self.part.shard_size, doc="S = Φ_pad / N")

    # ---- collectives over the dp group (no-ops with one rank) -----------------------------------
    def _reduce_scatter(self, buffer):
        # reduce-scatter (avg) over dp: a unit's gradients (padded,) in, my averaged chunk out
        return buffer if self.shard_group is None else self.shard_group.reduce_scatter(buffer, op="avg")

    def _all_gather(self, chunk):
        # all-gather over dp: my chunk of a unit in, the unit's whole buffer (padded,) out
        return chunk if self.shard_group is None else self.shard_group.all_gather(chunk)

    # ---- gradients --------------------------------------------------------------------------------
    def zero_grad(self):
        """Zero the gradients; stages 0, 1 point every p.grad at its slot of the flat buffer."""
        self.sync = False              # communicate during this backward (the last micro-batch's)
        for u in self.part.units:
            u.ready = 0
        if self.flat_grad is not None:
            self.flat_grad[...] = 0
            self.part.point(self.flat_grad, "grad")
            return
        self.grad_shard[...] = 0
        for p in self.params:
            p.grad = None

    def set_last_micro_batch(self, last):
        self.sync = bool(last)

    def _on_grad(self, p):
        """Post-accumulate hook (stages 2, 3): reduce-scatter a unit once all its gradients are final.
        Stage 2 waits for the last micro-batch (sync); stage 3 cannot keep full gradients, so it
        reduce-scatters after every micro-batch's backward and accumulates into the shard."""
        self.ledger.add(f"grad:{p.name}", p.grad, "grad")    # a full gradient, alive until reduced
        if self.stage == 2 and not self.sync:
            return
        unit = self.part.unit_of[id(p)]
        unit.ready += 1
        if unit.ready == len(unit.params):
            self._reduce_unit(unit)

    def _reduce_unit(self, unit):
        """reduce-scatter one unit's gradients into my grad shard, then free them (stage 3: and the params)."""
        grads = unit.pack([p.grad for p in unit.params], self.xp, self.grad_shard.dtype)   # (padded,)
        self.grad_shard[unit.shard] += self._reduce_scatter(grads)
        for p in unit.params:
            p.grad = None
            if f"grad:{p.name}" in self.ledger:
                self.ledger.remove(f"grad:{p.name}")
        unit.ready = 0
        if self.stage == 3:
            self.release(unit)

    def finish(self):
        """After backward: my grad shard holds the average over dp of my chunk of every gradient."""
        if self.stage >= 2:                    # whatever backward did not reduce (sync was False)
            for u in self.part.units:
                if any(p.grad is not None for p in u.params):
                    self._reduce_unit(u)
            return
        u = self.part.units[0]                 # stages 0, 1: one unit, the whole flat gradient
        if self.stage == 0:
            if self.group is not None:
                # all-reduce (avg) over dp: the whole flat gradient, Φ entries
                self.group.all_reduce_(self.flat_grad, op="avg")
            return
        self.flat_grad[u.span][u.own] = self._reduce_scatter(self.flat_grad[u.span])
        for p in self.params:                  # only my chunk is averaged: hide the stale rest
            p.grad = None

    def grad_stats(self):
        """[sum of squares, count of non-finite] over my grad shard, entries of replicas
        (norm_owner False) and padding excluded; the engine sums this over the world."""
        g = self.grad_shard.astype(np.float64)
        squares = float(self.xp.where(self.norm_mask, g * g, 0.0).sum())
        return np.array([squares, float((~self.xp.isfinite(g)).sum())])

    # ---- the update -------------------------------------------------------------------------------
    def _own_params(self):
        """My shard of the parameters (S,): a view where it is contiguous, else a copy."""
        return self.param_shard if self.stage == 3 else self.part.shard_of(self.flat_param)

    def step(self, grad_scale=1.0):
        """Update my shard with grad * grad_scale, then all-gather the parameters (stages 1, 2)."""
        self.t += 1                            # ONE Adam step counter for the whole model
        own = self._own_params()
        new = self.optim.step(own, self.grad_shard, grad_scale, self.t)
        if self.stage == 3:
            if new is not own:
                self.param_shard[...] = new
            return
        if new is not own or not self.part.shard_is_view:   # a master copy, or chunks copied out
            self.part.scatter_shard(self.flat_param, new)
        if self.shard_group is not None:
            self.gather_params()

    def load_state(self, state, t):
        """A checkpoint's whole local arrays in: each is packed into units as at construction
        and only my chunks are kept (stage 3: of the parameters too). No communication."""
        params = {p.name: state[p.name]["param"] for p in self.params}
        own = self._own_params()
        flat = self.part.flatten(self.xp, own.dtype, params)               # (Φ_pad,)
        if self.stage == 3:
            self.param_shard[...] = self.part.shard_of(flat)                # (S,)
        else:
            self.flat_param[...] = flat                                     # p.data are views of it
        shards = {}
        for key, array in self.optim.shards().items():
            arrays = {p.name: state[p.name].get(key, params[p.name] if key == "master" else None)
                      for p in self.params}                                 # missing moments: zeros
            shards[key] = self.part.shard_of(self.part.flatten(self.xp, array.dtype, arrays))   # (S,)
        self.optim.load(shards)
        self.t = t

    def gather_params(self):
        """Stages 1, 2: every rank's updated chunks into every rank's whole flat parameters."""
        for u in self.part.units:
            # all-gather over dp: my updated chunk (padded/N) in, the unit's parameters (padded,) out
            self.flat_param[u.span] = self._all_gather(self.flat_param[u.span][u.own])

    # ---- stage 3: gather and release around each unit -------------------------------------------
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

    # ---- views for parity checks and reports (they communicate) ---------------------------------
    def _gathered_views(self, shard):
        """{parameter name: its full array} from a shard (S,), all-gathered unit by unit."""
        out = {}
        for u in self.part.units:
            full = self._all_gather(shard[u.shard])  # all-gather over dp, for inspection only
            out.update((p.name, view) for p, view in zip(u.params, u.views(full)))
        return out

    def state(self):
        """{serial name: {"m", "v", "master"}} in the local parameters' shapes, gathered over dp."""
        shards = dict(self.optim.shards())
        shards.setdefault("master", self._own_params())
        out = {p.name: {} for p in self.params}
        for key, shard in shards.items():
            for name, array in self._gathered_views(shard).items():
                out[name][key] = array
        return out

    @contextmanager
    def gathered(self):
        """For inspection: inside, every p.data (stage 3) and p.grad (the averaged gradient)
        is in full on every rank, as under plain DP; both are released on exit."""
        if self.stage == 3:
            for u in self.part.units:
                self.gather(u)
        if self.stage >= 1:
            grads = self._gathered_views(self.grad_shard)
            for p in self.params:
                p.grad = grads[p.name]
        try:
            yield self
        finally:
            if self.stage >= 1:
                for p in self.params:
                    p.grad = None
            if self.stage == 3:
                for u in self.part.units:
                    self.release(u)

    def report(self):
        """This rank's sizes, memory ledger and offload traffic of the last step (JSON-able)."""
        return {"stage": self.stage, "offload": self.offload, "dp": self.n, "numel": self.numel,
                "numel_padded": self.numel_padded, "shard_size": self.shard_size,
                "bytes_to_host": self.optim.bytes_to_host, "bytes_to_device": self.optim.bytes_to_device,
                "memory": self.ledger.report()}
