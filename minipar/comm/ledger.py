"""The comm ledger: every communication call, and the bytes it sends.

Each call is recorded in the group's `CommLedger`: op, group name, logical
dtype, elements and the bytes THIS rank sends if the collective runs as a ring
(Patarasuk & Yuan 2009), with S = bytes of the full buffer and n = group size:

    all_reduce             2(n-1)/n * S   reduce-scatter, then all-gather
    reduce_scatter          (n-1)/n * S   S = the full input; each rank keeps S/n
    all_gather              (n-1)/n * S   S = the full output; each rank brings S/n
    broadcast               (n-1)/n * S   n-1 ranks must each receive S: (n-1)*S
                                          in all, shared by the n ranks
    all_to_all              (n-1)/n * S   S = this rank's buffer; n-1 of its n blocks leave
    send, isend, sendrecv         S
    all_to_all              (n-1)/n * S   S = the whole send buffer, n equal blocks
    all_to_all_v                  sum over the other ranks r of the bytes sent to r
                                          (variable blocks: recorded by the caller)
    recv, irecv, barrier          0
    object, scalar                0       control traffic (pickled metadata, verdict
                                          flags): listed, but kept out of the volume

The values are per-rank averages: exact integers whenever n divides the
numerator, else the exact fraction as a float. The same numbers are recorded
whichever `algorithm` actually runs ("mpi": MPI's own collectives; "ring": the
Sendrecv loops in ring.py), so tests can assert the textbook formulas exactly.

A ledger made with a `clock` (e.g. CommLedger(clock=time.perf_counter)) also stamps
each entry's wall-clock `start` and `end` (the Group call that made it; for the
non-blocking isend / irecv / iall_reduce_ that is the posting, not the completion):
the communication events of a `--trace out.json` timeline. Without one they stay None;
`timed` is the decorator that stamps them on every Group method.
"""
import functools
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from minipar.backend import Transfers

_RING_FACTOR = {"all_reduce": 2, "reduce_scatter": 1, "all_gather": 1, "broadcast": 1, "all_to_all": 1}


def ring_bytes(op, nbytes, n):
    """Bytes one rank sends for `op` on a full buffer of `nbytes` (S) over n ranks."""
    if op in _RING_FACTOR:
        numerator = _RING_FACTOR[op] * (n - 1) * nbytes
        return numerator // n if numerator % n == 0 else numerator / n
    return nbytes if op in ("send", "isend", "sendrecv") else 0


@dataclass(frozen=True)
class CommEntry:
    op: str          # "all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", ...
    group: str       # name of the Group: "world", "dp", "tp", "pp", ...
    dtype: str       # logical dtype ("float16" even though it was summed in float32)
    elements: int    # elements of the full buffer S (all_gather: the output)
    bytes: int       # bytes this rank sends under a ring (see ring_bytes; a float if n does not divide)
    # wall-clock seconds of the call (the ledger's clock), None without a clock; not part of equality
    start: float | None = field(default=None, compare=False)
    end: float | None = field(default=None, compare=False)


class CommLedger:
    """Every communication call of the groups that share it, in order."""

    def __init__(self, entries=(), clock=None):
        self._entries = list(entries)
        self.clock = clock           # None: no timing; else a function -> seconds (time.perf_counter)
        # running totals of host <-> device copies made to stage device buffers (comm/wire.py)
        self.transfers = Transfers()

    def record(self, op, group, dtype, elements, nbytes):
        self._entries.append(CommEntry(op, group, dtype, elements, nbytes))

    def stamp(self, mark, start, end):
        """Give the entries recorded since `mark` that have no time yet the span (start, end):
        one Group call; an inner call (ring.py, iall_reduce_ -> all_reduce_) keeps its own."""
        self._entries[mark:] = [replace(e, start=start, end=end) if e.start is None else e
                                for e in self._entries[mark:]]

    @property
    def entries(self):
        return tuple(self._entries)

    def reset(self):
        self._entries.clear()
        self.transfers.reset()

    def _select(self, group=None, op=None):
        return [e for e in self._entries if group in (None, e.group) and op in (None, e.op)]

    def total_bytes(self, group=None, op=None):
        return sum(e.bytes for e in self._select(group, op))

    def total_elements(self, group=None, op=None):
        return sum(e.elements for e in self._select(group, op))

    def summary(self):
        """{group: {op: {"calls": c, "elements": e, "bytes": b}}}"""
        out = {}
        for e in self._entries:
            row = out.setdefault(e.group, {}).setdefault(e.op, {"calls": 0, "elements": 0, "bytes": 0})
            row["calls"] += 1
            row["elements"] += e.elements
            row["bytes"] += e.bytes
        return out

    def snapshot(self):
        """A mark; `since(mark)` returns the calls made after it."""
        return len(self._entries)

    def since(self, mark):
        return CommLedger(self._entries[mark:])

    @contextmanager
    def measure(self):
        """`with ledger.measure() as step: ...`; afterwards `step` holds the calls made inside."""
        window, mark = CommLedger(), self.snapshot()
        try:
            yield window
        finally:
            window._entries = self._entries[mark:]

    def format(self):
        """The summary as a small table, one line per (group, op)."""
        lines = [f"{'group':<8} {'op':<15} {'calls':>6} {'elements':>12} {'bytes sent':>14}"]
        for group, ops in self.summary().items():
            for op, row in ops.items():
                sent = f"{row['bytes']:,}" if isinstance(row["bytes"], int) else f"{row['bytes']:,.1f}"
                lines.append(f"{group:<8} {op:<15} {row['calls']:>6} {row['elements']:>12,} {sent:>14}")
        return "\n".join(lines)


def timed(method):
    """Stamp the ledger entries a Group call records with the call's wall-clock span, when
    the ledger has a clock (the --trace timeline's communication events)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        ledger = self.ledger
        if ledger.clock is None:
            return method(self, *args, **kwargs)
        mark, start = ledger.snapshot(), ledger.clock()
        try:
            return method(self, *args, **kwargs)
        finally:
            ledger.stamp(mark, start, ledger.clock())
    return call
