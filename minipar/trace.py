"""Per-rank event timeline: what each pipeline rank computed, and when, in wall time.

The pipeline executor owns one `Tracer` per rank and wraps every compute action:

    tracer = Tracer(rank)
    with tracer.span("F", mb, chunk):
        y = stage(x)

`gather(group)` brings every rank's events to every rank, on one time axis. From them:
`measured_bubble` (the bubble fraction of what really ran, same arithmetic as
schedules.bubble_fraction), `ascii_gantt` (wall time bucketed into columns), `save_png`
(a matplotlib Gantt; matplotlib is optional) and `summary`, which sets the measured
bubble next to the logical one (the executed action lists replayed with unit durations)
and the closed-form formula of the schedule.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from minipar.parallel import schedules
from minipar.parallel.schedules import COMPUTE_OPS, Action, Event

COLORS = {"F": "tab:blue", "B": "tab:green", "W": "tab:orange"}


class Tracer:
    """Collects one rank's Events; times are seconds since this tracer's t0.
    `clock` is injectable (tests pass a fake one); it defaults to time.perf_counter."""

    def __init__(self, rank: int, clock=time.perf_counter):
        self.rank = rank
        self.clock = clock
        self.t0 = clock()
        self.events: list[Event] = []

    def now(self) -> float:
        return self.clock() - self.t0

    @contextmanager
    def span(self, op: str, mb: int, chunk: int = 0):
        """Time the body of the `with` block as one action (op, mb, chunk)."""
        start = self.now()
        try:
            yield
        finally:
            self.record(op, mb, chunk, start, self.now())

    def record(self, op: str, mb: int, chunk: int, start: float, end: float) -> None:
        self.events.append(Event(self.rank, op, mb, chunk, start, end))

    def gather(self, group, shared_clock: bool = True) -> list[Event]:
        """Every rank's events on every rank, sorted by (rank, start). Each rank's t0
        travels along; with shared_clock the times are shifted onto the earliest t0, as
        perf_counter is one monotonic clock for all processes of a host. Across hosts
        pass shared_clock=False and create the tracers right after a barrier."""
        # allgather over `group` (pickled objects): this rank's (t0, [event tuples]),
        # a few numbers per action; every rank receives the list of all ranks' pairs
        per_rank = group.allgather_object((self.t0, [tuple(e) for e in self.events]))
        origin = min(t0 for t0, _ in per_rank)
        shift = [t0 - origin if shared_clock else 0.0 for t0, _ in per_rank]
        events = [Event(rank, op, mb, chunk, start + dt, end + dt)
                  for (_, rows), dt in zip(per_rank, shift) for rank, op, mb, chunk, start, end in rows]
        return sorted(events, key=lambda e: (e.rank, e.start))


def measured_bubble(events: list[Event], p: int) -> float:
    """1 - (busy seconds summed over ranks) / (p * makespan), from wall-time events."""
    return float(schedules.bubble_fraction(events, p))


def ascii_gantt(events: list[Event], p: int, width: int = 60) -> str:
    """The wall-time Gantt: the run is cut into `width` equal columns, each showing the
    action running at its midpoint; the first line gives the time per column."""
    compute = [e for e in events if e.op in COMPUTE_OPS]
    span = max(e.end for e in compute) - min(e.start for e in compute)
    header = f"{span * 1e3:.3f} ms in {width} columns, {span / width * 1e3:.3f} ms each"
    return header + "\n" + schedules.ascii_gantt(events, p, width)


def save_png(events: list[Event], path: str, title: str = "") -> None:
    """Draw the Gantt (one lane per rank, F/B/W coloured, micro-batch numbers inside)
    to `path`. Needs matplotlib, imported only here."""
    try:
        from matplotlib.figure import Figure   # no pyplot: no global figure state
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError("save_png needs matplotlib: pip install minipar[plot]") from err
    compute = [e for e in events if e.op in COMPUTE_OPS]
    p = max(e.rank for e in compute) + 1
    fig = Figure(figsize=(12, 0.6 * p + 1.2))
    ax = fig.subplots()
    for e in compute:
        ax.broken_barh([(e.start, e.end - e.start)], (e.rank - 0.4, 0.8),
                       facecolors=COLORS[e.op], edgecolors="white", linewidth=0.5)
        label = f"{e.mb}" + (f".{e.chunk}" if e.chunk else "")
        ax.text((e.start + e.end) / 2, e.rank, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(p), [f"rank {r}" for r in range(p)])
    ax.invert_yaxis()                            # rank 0 on top, as in ascii_gantt
    ax.set_xlabel("time (s)")
    ax.set_title(title)
    present = {e.op for e in compute}
    ax.legend(handles=[Patch(color=c, label=op) for op, c in COLORS.items() if op in present],
              loc="upper left", bbox_to_anchor=(1.0, 1.0))          # outside, right of the lanes
    fig.tight_layout()
    fig.savefig(path)


def summary(events: list[Event], p: int, schedule: str, m: int, v: int = 1,
            actions: list[list[Action]] | None = None) -> dict:
    """Bubble three ways plus timings, for a run of `schedule` (its name) on p ranks.
      measured  wall-time bubble of `events`
      logical   the executed per-rank Action lists (`actions`; by default the schedule
                itself) replayed by schedules.simulate with F = B = W = 1
      formula   schedules.bubble_formula(schedule, p, m, v)
    """
    if actions is None:
        actions = schedules.make_schedule(schedule, p, m, v)
    compute = [e for e in events if e.op in COMPUTE_OPS]
    return {
        "bubble": {
            "measured": measured_bubble(compute, p),
            "logical": float(schedules.bubble_fraction(schedules.simulate(actions, p, v), p)),
            "formula": float(schedules.bubble_formula(schedule, p, m, v)),
        },
        "makespan_s": max(e.end for e in compute) - min(e.start for e in compute),
        "per_rank_busy_s": [sum(e.end - e.start for e in compute if e.rank == r) for r in range(p)],
    }
