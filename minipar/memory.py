"""Memory: a ledger of what each rank holds, by category and placement, with peaks.

Every parameter, gradient, master weight, Adam state, saved activation, padding
and communication buffer is registered by name with its bytes, a *category* and
a *placement* ("device" or "host", the latter for ZeRO-Offload). The ledger
keeps the current bytes and the peak bytes per category x placement cell, per
category, per placement and in total:

                 device        host
    param        2Φ            .          <- mixed precision, plain DP
    grad         2Φ            .
    master       4Φ            .          <- K = 12 bytes/param of optimizer
    optim_m      4Φ            .             state: master + m + v, fp32
    optim_v      4Φ            .
    activation   saved(n) - released(n)   <- fed by autograd.track_saved
    padding      flat buffers rounded up to a multiple of N
    buffer       communication / staging buffers

The formulas these bytes must agree with (ZeRO's model states, Korthikanti et
al.'s activations) are in formulas.py.

Accounting is not measuring. `measure_alive()` reads what Python really has
allocated (NumPy reports its array buffers to `tracemalloc`), so a test can
check that the ledger's categories add up to what is alive.
"""
import tracemalloc
from contextlib import contextmanager

import numpy

from minipar.backend import Transfers

CATEGORIES = ("param", "grad", "master", "optim_m", "optim_v", "activation", "padding", "buffer")
PLACEMENTS = ("device", "host")
MODEL_STATE = ("param", "grad", "master", "optim_m", "optim_v", "padding")


# ----------------------------------------------------------------------------- ledger

class MemoryLedger:
    """Bytes one rank holds, by name, category and placement, with peaks."""

    def __init__(self, rank=0):
        self.rank = rank
        self._entries = {}        # name -> (nbytes, category, placement)
        self._saved = 0           # anonymous activation bytes from saved()/released()
        # current and peak bytes, keyed (category or None, placement or None);
        # None means "summed over all", so (None, None) is the rank's total
        self._current = {}
        self._peak = {}
        # bytes copied between host and device memory, each way (0 on the CPU): parameters
        # once, batches every step, ZeRO-Offload's shards, checkpoints and predictions
        self.transfers = Transfers()

    # -- registering arrays

    def add(self, name, nbytes_or_array, category, placement="device"):
        """Register `name` (an array, whose .nbytes is used, or a byte count).
        Re-adding an existing name replaces it (a resize); returns the bytes."""
        _check(category, placement)
        nbytes = getattr(nbytes_or_array, "nbytes", nbytes_or_array)
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, numpy.integer)) or nbytes < 0:
            raise ValueError(f"{name!r}: expected an array or a byte count >= 0, got {nbytes_or_array!r}")
        if name in self._entries:
            self.remove(name)
        self._entries[name] = (int(nbytes), category, placement)
        self._change(category, placement, int(nbytes))
        return int(nbytes)

    def remove(self, name):
        """Forget `name` (its memory was freed)."""
        try:
            nbytes, category, placement = self._entries.pop(name)
        except KeyError:
            raise KeyError(f"rank {self.rank}: no array named {name!r} in the memory ledger") from None
        self._change(category, placement, -nbytes)

    def __contains__(self, name):
        return name in self._entries

    def names(self, category=None, placement=None):
        """Registered names, optionally of one category and/or placement."""
        return [n for n, (_, c, p) in self._entries.items()
                if category in (None, c) and placement in (None, p)]

    # -- the saved-activation tracker protocol of autograd.track_saved

    def saved(self, nbytes):
        """A Function saved `nbytes` for backward: category "activation"."""
        self._saved += nbytes
        self._change("activation", "device", nbytes)

    def released(self, nbytes):
        """Its backward ran and the saved arrays were dropped."""
        if nbytes > self._saved:
            raise ValueError(f"rank {self.rank}: released {nbytes} activation bytes, "
                             f"but only {self._saved} are saved")
        self._saved -= nbytes
        self._change("activation", "device", -nbytes)

    # -- reading it

    def current(self, category=None, placement=None):
        """Bytes held now (None = summed over all categories / placements)."""
        _check(category, placement, allow_none=True)
        return self._current.get((category, placement), 0)

    def peak(self, category=None, placement=None):
        """Most bytes held at any moment since creation or `reset_peak()`. The peak
        of a total is the peak of the sum, not the sum of the parts' peaks."""
        _check(category, placement, allow_none=True)
        return self._peak.get((category, placement), 0)

    def reset_peak(self):
        """Start a new peak window (e.g. one training step) from the current bytes."""
        self._peak = dict(self._current)

    def by_category(self, placement=None):
        """{category: current bytes} for every category."""
        return {c: self.current(c, placement) for c in CATEGORIES}

    def model_state_bytes(self, placement=None):
        """Parameters + gradients + master + Adam m, v + padding: what the ZeRO
        formulas predict."""
        return sum(self.current(c, placement) for c in MODEL_STATE)

    def report(self):
        """A JSON-able summary: totals and every category x placement cell."""
        return {
            "rank": self.rank,
            "current": self.current(),
            "peak": self.peak(),
            "model_state": self.model_state_bytes(),
            "by_category": {c: {p: {"current": self.current(c, p), "peak": self.peak(c, p)}
                                for p in PLACEMENTS} for c in CATEGORIES},
        }

    def _change(self, category, placement, delta):
        for key in ((category, placement), (category, None), (None, placement), (None, None)):
            now = self._current.get(key, 0) + delta
            self._current[key] = now
            self._peak[key] = max(self._peak.get(key, 0), now)


def _check(category, placement, allow_none=False):
    if not (category in CATEGORIES or (allow_none and category is None)):
        raise ValueError(f"unknown memory category {category!r}: expected one of {', '.join(CATEGORIES)}")
    if not (placement in PLACEMENTS or (allow_none and placement is None)):
        raise ValueError(f"unknown placement {placement!r}: expected 'device' or 'host'")


# ----------------------------------------------------------------------------- measuring

def traced_bytes():
    """(current, peak) bytes Python has allocated, as tracemalloc sees them
    (NumPy array buffers included); (0, 0) when tracemalloc is not tracing."""
    return tracemalloc.get_traced_memory()


class AliveBytes:
    """What `measure_alive()` sees, in bytes relative to the start of the block:
    `now()` while inside it; `alive` (still allocated) and `peak` (high-water
    mark) once it has ended."""

    def __init__(self, base):
        self.base, self.alive, self.peak = base, 0, 0

    def now(self):
        return tracemalloc.get_traced_memory()[0] - self.base


@contextmanager
def measure_alive():
    """The cross-check for the ledger: measure real allocations inside a block.

        with measure_alive() as m:
            w = numpy.zeros(1000); ledger.add("w", w, "param")
            assert m.now() ~= ledger.current()   # up to Python object overhead

    Starts tracemalloc if needed (slow while on) and resets its peak, so blocks
    must not be nested. tracemalloc forgets everything when it stops, so only
    arrays allocated inside the block are seen (freeing older ones is not)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    result = AliveBytes(tracemalloc.get_traced_memory()[0])
    try:
        yield result
    finally:
        now, peak = tracemalloc.get_traced_memory()
        result.alive, result.peak = now - result.base, peak - result.base
        if started:
            tracemalloc.stop()
