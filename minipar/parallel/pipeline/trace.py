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

`gather_timeline` + `write_chrome_trace` write one step as a Chrome trace-event JSON
(`--trace out.json`; opens in ui.perfetto.dev and chrome://tracing) for any layout: one
process per world rank, a track for the step, one per pipeline stage it holds, and one for
its communication calls, timed by a comm ledger with a clock (comm/ledger.py).
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

from minipar.parallel.pipeline import schedules
from minipar.parallel.pipeline.schedules import COMPUTE_OPS, Action, Event

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


def row_labels(world_ranks, v: int = 1) -> list[str]:
    """Gantt row names for a pipeline whose pp ranks are the world ranks `world_ranks`:
    pipeline rank r holds virtual stages r, r + p, ... (stages.virtual_stage)."""
    p = len(world_ranks)
    return [f"stage{'s' if v > 1 else ''} {','.join(str(c * p + r) for c in range(v))} · world rank {w}"
            for r, w in enumerate(world_ranks)]


def fits(label: str, width_px: float, fontsize: float, dpi: float) -> bool:
    """Whether `label` fits inside a bar `width_px` pixels wide (about 0.6 em per character)."""
    return width_px >= (len(label) * 0.6 + 0.4) * fontsize * dpi / 72


def bar_color(mb: int, chunk: int, v: int):
    """Micro-batch mb's colour (tab10 hues, cycling); later chunks of the same micro-batch lighter."""
    from matplotlib import colormaps
    r, g, b, _ = colormaps["tab10"](mb % 10)
    light = 0.55 * chunk / max(v - 1, 1)          # 0 for chunk 0, 0.55 for the last chunk
    return (r + (1 - r) * light, g + (1 - g) * light, b + (1 - b) * light)


HATCH = {"F": "", "B": "///", "W": "..."}


def save_png(events: list[Event], path: str, title: str = "", labels: list[str] | None = None) -> str:
    """Draw the Gantt to `path` and return the path: one row per pipeline rank (named by
    `labels`, default "stage r"), time from 0 in ms, colour per micro-batch, lighter per later
    chunk, hatch per op (F plain, B ///, W ...), a label "F3" only where it fits. Needs
    matplotlib, imported only here."""
    try:
        from matplotlib.figure import Figure   # no pyplot: no global figure state
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError("save_png needs matplotlib: pip install minipar[plot]") from err
    compute = [e for e in events if e.op in COMPUTE_OPS]
    p = max(e.rank for e in compute) + 1
    v = max(e.chunk for e in compute) + 1
    origin = min(e.start for e in compute)
    span_ms = (max(e.end for e in compute) - origin) * 1e3
    labels = labels or [f"stage {r}" for r in range(p)]
    present = sorted({e.op for e in compute}, key="FBW".index)
    handles = [Patch(facecolor="white", edgecolor="black", hatch=HATCH[op], label=op) for op in present]
    handles += [Patch(color=bar_color(0, c, v), label=f"chunk {c} (mb 0)") for c in range(v)] if v > 1 else []
    fig = Figure(figsize=(12, 0.6 * p + 1.4), dpi=100)
    ax = fig.subplots()
    ax.set_xlim(0, span_ms)
    ax.set_ylim(p - 0.5, -0.5)                   # stage 0 on top, as in ascii_gantt
    ax.set_yticks(range(p), labels)
    ax.set_xlabel("time since the step's first action (ms)")
    ax.set_title(title)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              title="colour = micro-batch", fontsize=7, title_fontsize=7)
    fig.tight_layout()                           # the final layout: now bar widths in pixels are known
    px_per_ms = ax.get_window_extent().width / span_ms
    for e in compute:
        start, width = (e.start - origin) * 1e3, (e.end - e.start) * 1e3
        ax.broken_barh([(start, width)], (e.rank - 0.4, 0.8), facecolors=bar_color(e.mb, e.chunk, v),
                       edgecolors="black", linewidth=0.3, hatch=HATCH[e.op])
        label = f"{e.op}{e.mb}"
        if fits(label, width * px_per_ms, 7, fig.dpi):
            ax.text(start + width / 2, e.rank, label, ha="center", va="center", fontsize=7)
    fig.savefig(path)
    return path


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


# ---- Chrome trace-event format (Perfetto, chrome://tracing) ------------------------------
STEP_TID, COMM_TID = 0, 100       # track ids of a rank's step span and its communication calls


def gather_timeline(world, grid, tracer, ledger, step: tuple) -> list[dict]:
    """Every world rank's timeline of one step, on every rank (collective over `world`).
    `step` = (index, start, end) in wall-clock seconds. Per rank: its grid coordinates, its
    pipeline actions (`tracer`, None without a pipeline) and the communication calls its
    `ledger` stamped (a ledger with a clock) that began within the step. Times are the
    clock's absolute seconds: tracer and ledger must share one clock (time.perf_counter)."""
    _, since, until = step
    compute = [] if tracer is None else [(e.op, e.mb, e.chunk, e.start + tracer.t0, e.end + tracer.t0)
                                         for e in tracer.events if since <= e.start + tracer.t0 <= until]
    comm = [(e.op, e.group, e.dtype, e.elements, e.bytes, e.start, e.end)
            for e in ledger.entries if e.start is not None and since <= e.start <= until]
    mine = {"rank": world.rank, "coords": None if grid is None else (grid.dp_rank, grid.pp_rank, grid.tp_rank),
            "pp": 1 if grid is None else grid.pp, "compute": compute, "comm": comm, "step": step}
    # allgather (pickled objects) over world: each rank's actions and comm calls of one step,
    # a few numbers each; every rank receives every rank's dict
    return world.allgather_object(mine) if world.size > 1 else [mine]


def chrome_trace(timeline: list[dict], title: str = "") -> dict:
    """The Trace Event Format's JSON object form: {"traceEvents": [...], ...}. One process
    (pid) per world rank, named with its grid coordinates; in it one track (tid) for the step,
    one per pipeline stage the rank holds (F/B/W and the executor's SEND/RECV waits) and one
    for communication (every ledger call: op, group, bytes). Complete events ('X'): ts and
    dur in microseconds from the earliest event; metadata events ('M') name the tracks."""
    origin = min(r["step"][1] for r in timeline)

    def us(t):
        return round((t - origin) * 1e6, 3)

    events = []
    for r in timeline:
        pid, (d, p, t) = r["rank"], r["coords"] or (0, 0, 0)

        def meta(name, tid, args):
            events.append({"name": name, "ph": "M", "ts": 0, "pid": pid, "tid": tid, "args": args})

        def span(name, cat, tid, start, end, args):
            events.append({"name": name, "cat": cat, "ph": "X", "ts": us(start), "dur": round((end - start) * 1e6, 3),
                           "pid": pid, "tid": tid, "args": args})

        meta("process_name", STEP_TID, {"name": f"rank {pid} (dp {d}, pp {p}, tp {t})"})
        meta("process_sort_index", STEP_TID, {"sort_index": pid})
        meta("thread_name", STEP_TID, {"name": "step"})
        meta("thread_name", COMM_TID, {"name": "communication"})
        index, start, end = r["step"]
        span(f"step {index}", "step", STEP_TID, start, end, {"step": index})
        for chunk in sorted({e[2] for e in r["compute"]}):
            stage = chunk * r["pp"] + p                              # stages.virtual_stage
            meta("thread_name", 1 + chunk, {"name": f"stage {stage}" + (f" (chunk {chunk})" if chunk else "")})
            meta("thread_sort_index", 1 + chunk, {"sort_index": 1 + chunk})
        for op, mb, chunk, start, end in r["compute"]:
            span(f"{op}{mb}", "compute" if op in COMPUTE_OPS else "pipeline p2p", 1 + chunk, start, end,
                 {"micro_batch": mb, "chunk": chunk, "stage": chunk * r["pp"] + p})
        for op, group, dtype, elements, nbytes, start, end in r["comm"]:
            span(f"{op} {group}", "comm", COMM_TID, start, end,
                 {"group": group, "dtype": dtype, "elements": elements, "bytes_sent": nbytes})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"title": title, "time_origin": "the earliest event of the traced step"}}


def write_chrome_trace(timeline: list[dict], path: str, title: str = "") -> str:
    """Write chrome_trace(timeline) as JSON to `path` (open it in ui.perfetto.dev or
    chrome://tracing); returns the path. Atomic: written beside it, then renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(chrome_trace(timeline, title), f)
    os.replace(tmp, path)
    return path
