"""Flat buffers and their partition over the data-parallel group: ZeRO's bookkeeping.

ZeRO (Rajbhandari et al. 2020) cuts every model-state array into N equal pieces,
one per data-parallel rank. For equal pieces and contiguous collectives, the
parameters are grouped into *units*. A unit's parameters are flattened one
after another into a single buffer, padded with zeros to a multiple of N
(`formulas.padded_numel`), and rank r owns chunk r of it:

    one unit, numel = 10, N = 4  ->  padded = 12, chunk = 3

    unit buffer   [ w w w w w w | b b b b | 0 0 ]      w (2, 3), b (4,), 2 padding
    chunks        [ rank 0  | rank 1 | rank 2 | rank 3 ]

A rank's *shard* is its chunk of every unit, concatenated (S = sum of the chunks
= Φ_pad / N elements): the flat arrays its optimizer updates (master, m, v).
MPI's Reduce_scatter_block hands rank r block r of a unit buffer, and Allgather
puts rank r's chunk back at block r, so the collectives and `chunk_bounds`
agree on who owns what.

    shard of rank 1   [ unit 0 chunk 1 | unit 1 chunk 1 | ... ]      S elements

Which parameters make a unit depends on the stage (`unit_groups`):
    stages 0, 1  one unit: the whole model is one flat buffer cut into N shards
    stage 2      the gradient buckets, in backward order, each reduce-scattered
                 as soon as its gradients are final
    stage 3      the gathering granularity: one unit per transformer Block, and
                 a root unit with everything else (wte, wpe, ln_f, lm_head)

Padding is per unit, so Φ_pad = sum over units of padded_numel(numel, N).
"""
import numpy as np

from minipar.backend import array_module
from minipar.formulas import padded_numel


def chunk_bounds(rank, chunk):
    """Rank `rank`'s chunk of a unit buffer: elements [rank*chunk, (rank+1)*chunk)."""
    return slice(rank * chunk, (rank + 1) * chunk)


class Unit:
    """Parameters flattened into one buffer of `padded` elements; this rank owns `own`."""

    def __init__(self, name, params, n, rank, start, shard_start):
        self.name, self.params = name, list(params)
        self.offsets = np.cumsum([0] + [p.data.size for p in self.params]).tolist()  # param i: [o_i, o_i+1)
        self.numel = self.offsets[-1]
        self.padded = padded_numel(self.numel, n)
        self.chunk = self.padded // n
        self.span = slice(start, start + self.padded)               # in a whole flat buffer (Φ_pad,)
        self.shard = slice(shard_start, shard_start + self.chunk)   # in this rank's shard (S,)
        self.own = chunk_bounds(rank, self.chunk)                    # in this unit's buffer (padded,)
        self.pad = max(0, self.own.stop - max(self.own.start, self.numel))   # padding inside my chunk
        self.ready = 0            # gradients final in this backward (stages 2, 3)
        self.gathered = False     # parameters materialised in full (stage 3)

    def views(self, buffer):
        """Per-parameter views of a (padded,) unit buffer, each shaped like its parameter."""
        return [buffer[a:b].reshape(p.data.shape)
                for p, a, b in zip(self.params, self.offsets, self.offsets[1:])]

    def pack(self, arrays, xp, dtype):
        """A new (padded,) buffer holding `arrays` (one per parameter; None = zeros) one after
        another, then zero padding: what a reduce-scatter or the initial sharding needs."""
        out = xp.zeros(self.padded, dtype)
        for a, b, array in zip(self.offsets, self.offsets[1:], arrays):
            if array is not None:
                out[a:b] = array.reshape(-1)                        # (numel_i,)
        return out


class Partition:
    """The units of a parameter list over N ranks, and this rank's shard of them.

    numel: Φ (real entries)   padded: Φ_pad = sum of padded unit sizes
    shard_size: S = Φ_pad / N   shard_pad: padding entries inside this rank's shard"""

    def __init__(self, groups, n, rank):
        self.n, self.rank, self.units = n, rank, []
        start = shard_start = 0
        for name, params in groups:
            unit = Unit(name, params, n, rank, start, shard_start)
            self.units.append(unit)
            start, shard_start = start + unit.padded, shard_start + unit.chunk
        self.padded, self.shard_size = start, shard_start
        self.numel = sum(u.numel for u in self.units)
        self.shard_pad = sum(u.pad for u in self.units)
        self.unit_of = {id(p): u for u in self.units for p in u.params}
        self.shard_is_view = len(self.units) == 1    # shard_of returns a view, not a copy

    def flatten(self, xp, dtype, arrays=None):
        """A new whole flat buffer (Φ_pad,) holding every parameter's data, unit by unit, or
        `arrays[p.name]` in its place (None: zeros), as a checkpoint's state is loaded."""
        of = (lambda p: p.data) if arrays is None else (lambda p: arrays[p.name])
        return xp.concatenate([u.pack([of(p) for p in u.params], xp, dtype) for u in self.units])

    def point(self, flat, attr):
        """Set every parameter's `attr` ("data" or "grad") to its view of a whole flat buffer."""
        for u in self.units:
            for p, view in zip(u.params, u.views(flat[u.span])):
                setattr(p, attr, view)

    def shard_of(self, flat):
        """This rank's shard (S,) of a whole flat buffer: a view if there is one unit, else a copy."""
        pieces = [flat[u.span][u.own] for u in self.units]
        return pieces[0] if len(pieces) == 1 else array_module(flat).concatenate(pieces)

    def scatter_shard(self, flat, shard):
        """Write a shard (S,) back into this rank's chunks of a whole flat buffer."""
        for u in self.units:
            flat[u.span][u.own] = shard[u.shard]

    def owner_mask(self, xp):
        """(S,) bool: True where my shard holds an entry of a parameter whose gradient norm this
        rank counts (`p.spec.norm_owner`, default True; False on replicas), False on padding."""
        pieces = []
        for u in self.units:
            flags = [p.spec.norm_owner for p in u.params]
            per_entry = np.zeros(u.padded, bool)
            per_entry[:u.numel] = np.repeat(flags, np.diff(u.offsets))   # (numel,) one flag per entry
            pieces.append(per_entry[u.own])
        return xp.asarray(np.concatenate(pieces))


def unit_groups(params, stage, model=None, bucket_bytes=2 ** 20):
    """[(name, params)]: how a stage groups parameters into units (see the module docstring)."""
    params = list(params)
    if stage <= 1:
        return [("all", params)]
    if stage == 2:                                   # buckets in reverse order: backward's order
        groups, run, size = [], [], 0
        for p in params[::-1]:
            if run and size + p.data.nbytes > bucket_bytes:
                groups.append((f"bucket{len(groups)}", run))
                run, size = [], 0
            run.append(p)
            size += p.data.nbytes
        return groups + [(f"bucket{len(groups)}", run)]
    if model is None:
        raise ValueError("ZeRO-3 needs the model: its Blocks are the units it gathers and releases")
    blocks = [[p for p in b.parameters() if p.requires_grad] for b in model.blocks]
    in_block = {id(p) for block in blocks for p in block}
    if not in_block <= {id(p) for p in params}:
        raise ValueError("ZeRO-3: the parameters given are not all of the model's own")
    root = [p for p in params if id(p) not in in_block]
    return [("root", root)] + [(f"blocks.{i}", block) for i, block in enumerate(blocks)]


def register(ledger, name, array, category, pad=0, placement="device"):
    """Ledger entries for a flat buffer: its real entries under `category`, its `pad`
    padding entries under "padding"."""
    itemsize = array.dtype.itemsize
    ledger.add(name, (array.size - pad) * itemsize, category, placement)
    if pad:
        ledger.add(f"{name}:padding", pad * itemsize, "padding", placement)


def unregister(ledger, name):
    """Remove what `register` added under `name` (the memory was freed)."""
    ledger.remove(name)
    if f"{name}:padding" in ledger:
        ledger.remove(f"{name}:padding")
