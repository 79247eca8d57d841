"""What every ZeRO stage shares: the partition, the shard optimizer, the dp collectives.

A stage class (stage0.py to stage3.py) is the engine's gradient sync and its
optimizer at once (both contracts of contracts.py). `ZeroBase` builds what they
all have: the units of the stage (partition.py: flat buffers padded to a
multiple of N, rank r owns chunk r), cut over the stage's shard group, and a
`ShardOptimizer` (shard_optimizer.py) that updates this rank's shard S = Φ_pad / N,
on the device or, with offload, on the host. It also owns the pieces that read
the shard back: grad_stats(), state(), load_state() and report().

A stage declares the rest, in the order the constructor places it:

    _shard_group()          the group the model states are cut over (None: not cut)
    _place_params(flat)     where the parameters live: a whole flat buffer, or a shard
    _place_grads(flat)      where the gradients land: a whole flat buffer, or a shard
    _own_params()           my shard of the parameters (S,), what the optimizer updates
    _put_params(own, new)   the updated shard back into the parameters (and all-gathered)
    _load_params(flat)      a checkpoint's whole flat parameters (Φ_pad,) in
    _norm_mask()            (S,) host bool: the entries of my shard this rank counts in ||g||
    zero_grad(), finish(), gathered()       the contracts' remaining methods
"""
import math
from abc import abstractmethod

import numpy as np

from minipar.backend import array_module
from minipar.contracts import GradientSync, ModelOptimizer
from minipar.optim import GRAD_STATS_CHUNK, sum_squares
from minipar.parallel.zero.partition import Partition, unit_groups
from minipar.parallel.zero.shard_optimizer import ShardOptimizer


class ZeroBase(GradientSync, ModelOptimizer):
    """Gradient sync and optimizer in one: the engine calls zero_grad(), set_last_micro_batch()
    before each backward, then finish(), grad_stats(), step(). `stage` names the subclass."""

    stage = None                   # 0, 1, 2 or 3: set by each stage class
    shards_gradients = True        # grad_stats() covers my shard: summed over the whole world

    def __init__(self, params, dp_group, layout, optim_cfg, precision, ledger, model=None):
        self.offload = layout.offload                  # for report(): the optimizer's placement
        self.params = [p for p in params if p.requires_grad]
        self.ledger, self.precision, self.sync, self.t = ledger, precision, False, 0
        self.n = dp_group.size if dp_group is not None else 1
        self.dp_rank = dp_group.rank if dp_group is not None else 0
        self.group = dp_group if self.n > 1 else None                 # None: nothing to communicate
        self.shard_group = self._shard_group()
        n, rank = (self.n, self.dp_rank) if self.shard_group is not None else (1, 0)
        self.part = part = Partition(unit_groups(self.params, self.stage, model, layout.bucket_bytes),
                                     n, rank)
        xp, dtype = array_module(self.params[0].data), self.params[0].data.dtype
        self.xp, flat = xp, part.flatten(xp, dtype)                 # (Φ_pad,) every parameter
        self._place_params(flat)
        self._place_grads(flat)
        self.optim = ShardOptimizer(optim_cfg, precision, self._own_params(), ledger, part.shard_pad,
                                    layout.offload)
        self.norm_runs = true_runs(self._norm_mask())          # [(lo, hi)] of my shard counted in ||g||
        self.stats_buf = xp.empty(min(GRAD_STATS_CHUNK, part.shard_size), np.float64)   # grad_stats' scratch
        self.zero_grad()

    # ---- what a stage declares ------------------------------------------------------------------
    @abstractmethod
    def _shard_group(self):
        """The group the model states are cut over: dp, or None (one rank, or stage 0)."""

    @abstractmethod
    def _place_params(self, flat):
        """Put the parameters (whole flat buffer (Φ_pad,) in) where this stage keeps them."""

    @abstractmethod
    def _place_grads(self, flat):
        """Allocate the gradient buffer of this stage (`flat` gives the shape and dtype)."""

    @abstractmethod
    def _own_params(self):
        """My shard of the parameters (S,): a view where it is contiguous, else a copy."""

    @abstractmethod
    def _put_params(self, own, new):
        """After the update: my shard `new` (S,) back into the parameters."""

    @abstractmethod
    def _load_params(self, flat):
        """A checkpoint's whole flat parameters (Φ_pad,) in, kept as this stage keeps them."""

    def _norm_mask(self):
        """(S,) bool: my shard's entries that this rank counts in ||g||, replicas (norm_owner
        False) and padding excluded."""
        return self.part.owner_mask(np)

    # ---- sizes ------------------------------------------------------------------------------------
    numel = property(lambda self: self.part.numel, doc="Φ: parameters this rank's model part has")
    numel_padded = property(lambda self: self.part.padded, doc="Φ_pad: Φ with every unit padded")
    shard_size = property(lambda self: self.part.shard_size, doc="S = Φ_pad / N")

    # ---- collectives over the shard group (no-ops with one rank) --------------------------------
    def _reduce_scatter(self, buffer):
        # reduce-scatter (avg) over dp: a unit's gradients (padded,) in, my averaged chunk out
        return buffer if self.shard_group is None else self.shard_group.reduce_scatter(buffer, op="avg")

    def _all_gather(self, chunk):
        # all-gather over dp: my chunk of a unit in, the unit's whole buffer (padded,) out
        return chunk if self.shard_group is None else self.shard_group.all_gather(chunk)

    # ---- the contracts' shared methods ----------------------------------------------------------
    def set_last_micro_batch(self, last):
        self.sync = bool(last)         # communicate during this backward (the last micro-batch's)?

    def grad_stats(self):
        """[sum of squares, non-finite: 1 or 0] over my grad shard's counted entries (replicas,
        norm_owner False, and padding excluded: `norm_runs`); the engine sums this over the
        world. A replica's gradient equals its owner's, so a non-finite one is seen there."""
        squares = 0.0
        for lo, hi in self.norm_runs:          # float64 sums a chunk at a time, no (S,) temporaries
            squares += sum_squares(self.grad_shard[lo:hi], self.stats_buf)
        return np.array([squares, 0.0 if math.isfinite(squares) else 1.0])

    def step(self, grad_scale=1.0):
        """Update my shard with grad * grad_scale (ShardOptimizer), then put it back."""
        self.t += 1                            # ONE Adam step counter for the whole model
        own = self._own_params()
        self._put_params(own, self.optim.step(own, self.grad_shard, grad_scale, self.t))

    def load_state(self, state, t):
        """A checkpoint's whole local arrays in: each is packed into units as at construction
        and only my chunks are kept (stage 3: of the parameters too). No communication."""
        params = {p.name: state[p.name]["param"] for p in self.params}
        flat = self.part.flatten(self.xp, self._own_params().dtype, params)   # (Φ_pad,)
        self._load_params(flat)
        shards = {}
        for key, array in self.optim.shards().items():
            arrays = {p.name: state[p.name].get(key, params[p.name] if key == "master" else None)
                      for p in self.params}                                 # missing moments: zeros
            shards[key] = self.part.shard_of(self.part.flatten(self.xp, array.dtype, arrays))   # (S,)
        self.optim.load(shards)
        self.t = t

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

    def report(self):
        """This rank's sizes, memory ledger and offload traffic of the last step (JSON-able)."""
        return {"stage": self.stage, "offload": self.offload, "dp": self.n, "numel": self.numel,
                "numel_padded": self.numel_padded, "shard_size": self.shard_size,
                "bytes_to_host": self.optim.bytes_to_host, "bytes_to_device": self.optim.bytes_to_device,
                "memory": self.ledger.report()}


def true_runs(mask):
    """[(lo, hi)]: the maximal runs of True in a 1-D bool array, as Python ints."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return [(int(lo), int(hi)) for lo, hi in edges.reshape(-1, 2)]
