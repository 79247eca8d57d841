"""The optimizer of one ZeRO shard, on the device or, for ZeRO-Offload, on the host.

ZeRO partitions the optimizer states: rank r keeps the fp32 master copy and
Adam's m and v (K = 12 bytes per parameter under mixed precision) for its
shard only, S = Φ/N entries, and updates just those (`ShardOptimizer` with
placement "device").

ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model
Training") moves that K·Φ/N part and the update itself to the host (CPU
memory), which is large, leaving the accelerator 2Φ + 2Φ/N (stage 2) bytes:

        device (fp16)                               host (fp32)
    grad shard  (S, fp16)  -- to_host: 2S bytes -->  g = grad * 1/loss_scale * clip
                                                     Adam on master, m, v (K·S bytes)
    param shard (S, fp16)  <-- to_device: 2S bytes --  master cast to fp16

Both moves go through backend.to_host / backend.to_device, so the same code
works on NumPy (where the "host" and "device" are the same memory and the moves
are copies or no-ops) and on CuPy (real PCIe transfers). The bytes moved each
way in the last step are `bytes_to_host` and `bytes_to_device`.

The host always keeps a master copy of the shard to update, even under the
fp32 / fp64 policies that keep none on the device: there, the host holds
(itemsize + K)·Φ/N bytes, one copy more than formulas.model_state_bytes_formula's
offload row (which assumes the K part only).
"""
import numpy as np

from minipar.backend import array_module, to_device, to_host
from minipar.optim import adamw_update, sgd_update
from minipar.parallel.zero.partition import register


class ShardOptimizer:
    """AdamW or SGD on a flat shard (S,). `offload` puts the state and the step on the host."""

    def __init__(self, cfg, precision, weights, ledger, pad=0, offload=False):
        if cfg.name not in ("adamw", "sgd"):
            raise ValueError(f"ZeRO: unknown optimizer {cfg.name!r}: expected adamw or sgd")
        self.cfg, self.offload = cfg, offload
        self.placement = "host" if offload else "device"
        self.device_xp, self.param_dtype = array_module(weights), weights.dtype
        dtype = precision.master_dtype
        if offload:
            # device -> host, once: the initial parameter shard becomes the host master copy (S,)
            self.master = to_host(weights, ledger.transfers).astype(dtype)
        elif precision.has_master:
            self.master = weights.astype(dtype)          # fp32 master of fp16 parameters (S,)
        else:
            self.master = None                           # fp32 / fp64: update the parameters in place
        xp = np if offload else self.device_xp
        adam = cfg.name == "adamw"
        self.m = xp.zeros(weights.size, dtype) if adam or cfg.momentum else None   # Adam m / SGD momentum
        self.v = xp.zeros(weights.size, dtype) if adam else None
        self.bytes_to_host = self.bytes_to_device = 0    # logical bytes of the last step, even on the CPU
        self.transfers = ledger.transfers                # real host <-> device copies, counted
        for name, array, category in (("master", self.master, "master"), ("m", self.m, "optim_m"),
                                      ("v", self.v, "optim_v")):
            if array is not None:
                register(ledger, f"{name}:shard", array, category, pad, self.placement)

    def step(self, weights, grads, grad_scale, t):
        """One update of the shard with gradient grads * grad_scale at Adam step t.

        `weights` is this rank's parameter shard on the device; returns its new value
        (on the device, in the parameter dtype: `weights` itself when updated in place)."""
        if self.offload:
            grads = to_host(grads, self.transfers)       # device -> host: the gradient shard, S entries
            self.bytes_to_host = grads.nbytes
        target = weights if self.master is None else self.master
        g = grads.astype(target.dtype) * grad_scale      # the serial optimizer's exact arithmetic
        cfg = self.cfg
        if cfg.name == "adamw":
            adamw_update(target, g, self.m, self.v, t, cfg.lr, cfg.beta1, cfg.beta2, cfg.eps,
                         cfg.weight_decay)
        else:
            sgd_update(target, g, self.m, cfg.lr, cfg.momentum, cfg.weight_decay)
        if not self.offload:
            return target
        # host -> device: the updated parameter shard, S entries in the parameter dtype
        new = to_device(self.master.astype(self.param_dtype), self.device_xp, self.transfers)
        self.bytes_to_device = new.nbytes
        return new

    def load(self, shards):
        """Set the state arrays this rank holds from {"master", "m", "v" | "momentum"} shards
        (S,) on the device: a restored checkpoint. Offload: each goes device -> host once."""
        for key, array in self.shards().items():
            array[...] = to_host(shards[key], self.transfers) if self.offload else shards[key]

    def shards(self):
        """{"master", "m", "v"}: the state arrays this rank holds (S,), those that exist."""
        names = ("master", "m", "v") if self.cfg.name == "adamw" else ("master", "momentum")
        return {k: a for k, a in zip(names, (self.master, self.m, self.v)) if a is not None}
