"""Pipeline schedules as data: which rank runs which forward/backward, in what order.

The model's layers are cut into S consecutive *virtual stages*. With plain pipelining
S = p (one stage per pipeline rank); with interleaving each rank holds v chunks and
S = p*v, chunk c of rank r being virtual stage s = c*p + r. A micro-batch's
activation walks s = 0, 1, ..., S-1 (forward) and its gradient walks back.

A schedule is a pure function ``(p, m[, v]) -> list[list[Action]]``: for each pipeline
rank, the ordered actions of one training step over m micro-batches. Compute actions:
  F  forward of (mb, chunk)
  B  backward; the input gradient dL/dx (plus dL/dW unless the schedule splits off W)
  W  weight gradient dL/dW only (split schedules: ZB-H1)
and the point-to-point messages around them: RECV_F right before an F (not on stage 0),
SEND_F right after it (not on stage S-1), RECV_B right before a B (not on stage S-1),
SEND_B right after it (not on stage 0). Sends are non-blocking (isend), receives block;
the executor in executor.py follows these lists exactly, and `simulate` replays them
under the same rules, so "no deadlock in simulate" means "no deadlock when run".

Time is *logical*: one unit per compute action (F = B = W = 1 unless told otherwise).
The bubble is the idle share of p ranks x makespan; in these units the formulas below
hold exactly, and the tests check ``bubble_fraction(simulate(...)) == bubble_formula(...)``
for every valid (p, m, v). `ascii_gantt(simulate(one_f_one_b(4, 8)), 4)`:

    rank 0 | F0 F1 F2 F3 .  .  .  B0 F4 B1 F5 B2 F6 B3 F7 B4 .  B5 .  B6 .  B7
    rank 1 | .  F0 F1 F2 .  .  B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 .  B6 .  B7 .
    rank 2 | .  .  F0 F1 .  B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 .  B7 .  .
    rank 3 | .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 .  .  .
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from minipar.layout import check_schedule   # the rules on (name, p, m, v), with the flags named

COMPUTE_OPS = ("F", "B", "W")
COMM_OPS = ("RECV_F", "SEND_F", "RECV_B", "SEND_B")


@dataclass(frozen=True)
class Action:
    """One step of a rank's program: op on micro-batch `mb` of local model chunk `chunk`."""
    op: str
    mb: int
    chunk: int = 0

    def __post_init__(self):
        if self.op not in COMPUTE_OPS + COMM_OPS:
            raise ValueError(f"unknown action op {self.op!r}; expected one of {COMPUTE_OPS + COMM_OPS}")

    def __str__(self):  # "F3", and "B3.1" for chunk 1 (chunks only exist when v > 1)
        return f"{self.op}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


class Event(NamedTuple):
    """A compute action that ran on `rank` from `start` to `end` (logical units or seconds)."""
    rank: int
    op: str
    mb: int
    chunk: int
    start: float
    end: float


def peer(action: Action, rank: int, p: int) -> tuple[int, int]:
    """(rank, chunk) at the other end of a SEND/RECV: the next virtual stage for SEND_F
    and RECV_B, the previous one for RECV_F and SEND_B."""
    stage = action.chunk * p + rank
    other = stage + 1 if action.op in ("SEND_F", "RECV_B") else stage - 1
    return other % p, other // p


def _with_comm(orders: list[list[tuple[str, int, int]]], p: int, v: int) -> list[list[Action]]:
    """Expand per-rank compute orders [(op, mb, chunk)] with the messages around each action."""
    last = p * v - 1
    schedules = []
    for rank, order in enumerate(orders):
        actions = []
        for op, mb, chunk in order:
            stage = chunk * p + rank
            if op == "F" and stage > 0:
                actions.append(Action("RECV_F", mb, chunk))
            if op == "B" and stage < last:
                actions.append(Action("RECV_B", mb, chunk))
            actions.append(Action(op, mb, chunk))
            if op == "F" and stage < last:
                actions.append(Action("SEND_F", mb, chunk))
            if op == "B" and stage > 0:
                actions.append(Action("SEND_B", mb, chunk))
        schedules.append(actions)
    return schedules


def gpipe(p: int, m: int) -> list[list[Action]]:
    """GPipe (Huang et al. 2019): every rank runs all m forwards, then all m backwards.
    Bubble (p-1)/(m+p-1); every rank holds all m micro-batches' activations at the peak."""
    check_schedule("gpipe", p, m)
    order = [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    return _with_comm([list(order) for _ in range(p)], p, 1)


def one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """1F1B / PipeDream-Flush (Narayanan et al. 2019): same bubble (p-1)/(m+p-1) as GPipe,
    but rank r keeps at most min(p - r, m) micro-batches in flight instead of m."""
    check_schedule("1f1b", p, m)
    orders = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        # Warmup: fill the pipe; rank r runs ahead by the p-r-1 stages below it.
        order = [("F", i, 0) for i in range(warmup)]
        # Steady: one forward, one backward, so activations in flight stay constant.
        for i in range(m - warmup):
            order += [("F", warmup + i, 0), ("B", i, 0)]
        # Cooldown: drain the backwards still owed.
        order += [("B", i, 0) for i in range(m - warmup, m)]
        orders.append(order)
    return _with_comm(orders, p, 1)


def interleaved(p: int, m: int, v: int) -> list[list[Action]]:
    """Interleaved 1F1B (Narayanan et al. 2021): rank r holds v chunks, chunk c being
    virtual stage c*p + r of S = p*v. Micro-batches go in groups of p: the k-th forward
    of a rank is mb (k // pv)*p + k % p on chunk (k // p) % v; backwards run the chunks in
    reverse. Bubble (p-1)/(vm+p-1) in units of one chunk's F (= t_F/v): v times smaller.

    Warmup is (v-1)p + (p-r-1) forwards, so v=1 is exactly 1F1B. Megatron-LM warms up
    (v-1)p + 2(p-r-1), which keeps a rank busy until its first backward arrives; with
    free communication the smaller warmup reaches the same makespan (simulate checks it)
    with fewer activations in flight: min(vp - r, vm) chunks, about p - r/v stages' worth.
    """
    check_schedule("interleaved", p, m, v)
    n = m * v                                   # forwards (and backwards) per rank

    def nth_forward(k: int) -> tuple[int, int]:  # -> (mb, chunk)
        group, k_in_group = divmod(k, p * v)
        chunk, j = divmod(k_in_group, p)
        return group * p + j, chunk

    def nth_backward(k: int) -> tuple[int, int]:
        mb, chunk = nth_forward(k)
        return mb, v - 1 - chunk

    orders = []
    for r in range(p):
        warmup = min((v - 1) * p + p - r - 1, n)
        # Warmup: all of chunks 0..v-2 for the first group, plus the 1F1B ramp.
        order = [("F", *nth_forward(k)) for k in range(warmup)]
        # Steady: 1F1B over (mb, chunk) pairs.
        for k in range(n - warmup):
            order += [("F", *nth_forward(warmup + k)), ("B", *nth_backward(k))]
        # Cooldown: the remaining backwards.
        order += [("B", *nth_backward(k)) for k in range(n - warmup, n)]
        orders.append(order)
    return _with_comm(orders, p, v)


def zb_h1(p: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism"): B computes only the
    input gradient, so it travels up the pipe in one unit per stage; the weight gradient W
    has no consumer downstream and is deferred to fill what would be bubble.

    Rank r: Warmup p-r forwards (1F1B's p-r-1 plus its first steady F: in flight <= p-r).
    Steady: B_j, then W_{j-r} (rank r runs its W's r micro-batches late), then the next F.
    Cooldown: the W's still owed, r of them. Rank 0 runs each W right after its B and
    holds p micro-batches at its peak, like 1F1B; the last rank alternates F and B and
    lets p-1 W's wait, filling exactly the units where 1F1B's cooldown idles. So from F
    to W no rank holds more than p micro-batches: ZB-H1's memory is 1F1B's.
    With F = B = W = 1 the makespan is max(3m + p - 1, 2m + 2p - 1). For m >= p that is
    the paper's bubble (p-1)(T_F + T_B - T_W) = p-1 units; for m < p, 2m + 2p - 1 is the
    best any schedule with 1F1B's in-flight limit can do (the last rank must alternate F
    and B).
    """
    check_schedule("zb-h1", p, m)
    orders = []
    for r in range(p):
        # Warmup: p-r forwards.
        next_f = min(p - r, m)
        order = [("F", i, 0) for i in range(next_f)]
        # Steady: B_j, the W that is r micro-batches behind it, the next F.
        for j in range(m):
            order.append(("B", j, 0))
            if j >= r:
                order.append(("W", j - r, 0))
            if next_f < m:
                order.append(("F", next_f, 0))
                next_f += 1
        # Cooldown: the last r W's (all of them if m <= r).
        order += [("W", i, 0) for i in range(max(m - r, 0), m)]
        orders.append(order)
    return _with_comm(orders, p, 1)


def make_schedule(name: str, p: int, m: int, v: int = 1) -> list[list[Action]]:
    """Dispatch on name: "gpipe" | "1f1b" | "interleaved" | "zb-h1"."""
    check_schedule(name, p, m, v)
    if name == "interleaved":
        return interleaved(p, m, v)
    return {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1}[name](p, m)


def simulate(schedules: list[list[Action]], p: int, v: int = 1, durations: dict | None = None) -> list[Event]:
    """Replay every rank's list in order: a compute action starts when its rank is free;
    a RECV waits for its matching SEND (sends and receives take no time). Raises
    RuntimeError("deadlock: ...") when no rank can move, or if a sent message is never
    received. Returns the compute actions as Events."""
    durations = {"F": 1, "B": 1, "W": 1, **(durations or {})}
    if len(schedules) != p:
        raise ValueError(f"got {len(schedules)} rank schedules for p={p}")
    clock, pc = [0] * p, [0] * p          # per-rank time and program counter
    sent: dict[tuple, float] = {}         # (kind, mb, receiving stage) -> send time
    events: list[Event] = []

    def message(a: Action, rank: int) -> tuple:
        to_rank, to_chunk = peer(a, rank, p) if a.op.startswith("SEND") else (rank, a.chunk)
        stage = to_chunk * p + to_rank
        if not 0 <= stage < p * v:
            raise ValueError(f"rank {rank}: {a} addresses virtual stage {stage}, outside 0..{p * v - 1}")
        return a.op[-1], a.mb, stage

    while any(pc[r] < len(schedules[r]) for r in range(p)):
        moved = False
        for r in range(p):
            while pc[r] < len(schedules[r]):
                a = schedules[r][pc[r]]
                if a.op.startswith("SEND"):
                    sent[message(a, r)] = clock[r]
                elif a.op.startswith("RECV"):
                    key = message(a, r)
                    if key not in sent:
                        break                    # blocked: the matching SEND has not run
                    clock[r] = max(clock[r], sent.pop(key))
                else:
                    start, clock[r] = clock[r], clock[r] + durations[a.op]
                    events.append(Event(r, a.op, a.mb, a.chunk, start, clock[r]))
                pc[r] += 1
                moved = True
        if not moved:
            waits = ", ".join(f"rank {r} at {schedules[r][pc[r]]} (step {pc[r]})"
                              for r in range(p) if pc[r] < len(schedules[r]))
            raise RuntimeError(f"deadlock: every unfinished rank waits on a receive: {waits}")
    if sent:
        raise RuntimeError(f"deadlock: messages sent but never received: {sorted(sent)}")
    return events


def bubble_fraction(events: list[Event], p: int):
    """1 - (compute busy time summed over ranks) / (p * makespan). Exact (a Fraction)
    when the times are integers or Fractions, as in logical time; a float otherwise."""
    compute = [e for e in events if e.op in COMPUTE_OPS]
    span = max(e.end for e in compute) - min(e.start for e in compute)
    busy = sum(e.end - e.start for e in compute)
    exact = all(isinstance(x, (int, Fraction)) for x in (span, busy))
    return Fraction(p * span - busy, p * span) if exact else 1 - busy / (p * span)


def bubble_formula(name: str, p: int, m: int, v: int = 1, paper: bool = False) -> Fraction:
    """Bubble fraction in logical time (F = B = W = 1 per action; one chunk's F for v > 1).
      gpipe, 1f1b   (p-1)/(m+p-1)       [also exact for any fixed t_F, t_B]
      interleaved   (p-1)/(vm+p-1)      [bubble time (p-1)(t_F+t_B)/v]
      zb-h1         (p-1)/(3m+p-1) for m >= p (the paper's (p-1)(T_F+T_B-T_W), times 3m);
                    (2p-m-1)/(2m+2p-1) for m < p, where this schedule's makespan is
                    2m+2p-1 > 3m+p-1. paper=True returns the paper's form for every m.
    """
    check_schedule(name, p, m, v)
    if name in ("gpipe", "1f1b"):
        return Fraction(p - 1, m + p - 1)
    if name == "interleaved":
        return Fraction(p - 1, v * m + p - 1)
    if m >= p or paper:
        return Fraction(p - 1, 3 * m + p - 1)
    return Fraction(2 * p - m - 1, 2 * m + 2 * p - 1)


def in_flight_peak(schedule_for_rank: list[Action]) -> int:
    """Most micro-batches whose F ran and whose B has not, on one rank: the number of
    stage activations held at once: GPipe m, 1F1B and ZB-H1 min(p - r, m) on rank r.
    Each (mb, chunk) counts separately, so for interleaved (min(vp - r, vm)) one count is
    an activation of 1/v of the layers. Pending W's (ZB-H1) are not counted: they keep
    only the inputs and output grads of their matmuls, not a whole stage's activations
    (`held_until_w_peak` counts them too)."""
    live = peak = 0
    for a in schedule_for_rank:
        live += (a.op == "F") - (a.op == "B")
        peak = max(peak, live)
    return peak


def held_until_w_peak(schedule_for_rank: list[Action]) -> int:
    """Most micro-batches whose F ran and whose weight gradient has not (B for unsplit
    schedules, W for ZB-H1): the paper's memory count. ZB-H1 keeps it <= p on every rank."""
    split = any(a.op == "W" for a in schedule_for_rank)
    live = peak = 0
    for a in schedule_for_rank:
        live += (a.op == "F") - (a.op == ("W" if split else "B"))
        peak = max(peak, live)
    return peak


def ascii_gantt(events: list[Event], p: int, width: int | None = None) -> str:
    """One row per rank, one column per time unit (or `width` equal buckets of the run):
    each column shows the action running at its midpoint ("F3", "B3.1", "W3"), "." if idle."""
    compute = [e for e in events if e.op in COMPUTE_OPS]
    t0, t1 = min(e.start for e in compute), max(e.end for e in compute)
    columns = width or math.ceil(t1 - t0)
    dt = (t1 - t0) / columns
    show_chunk = any(e.chunk for e in compute)
    label = {e: f"{e.op}{e.mb}" + (f".{e.chunk}" if show_chunk else "") for e in compute}
    cell = max(len(s) for s in label.values())
    rows = [["."] * columns for _ in range(p)]
    for e in compute:   # column k's midpoint t0 + (k + 1/2) dt lies in [start, end)
        first = math.ceil((e.start - t0) / dt - 0.5)
        stop = math.ceil((e.end - t0) / dt - 0.5)
        for k in range(max(first, 0), min(stop, columns)):
            rows[e.rank][k] = label[e]
    name = len(f"rank {p - 1}")
    return "\n".join(f"{f'rank {r}':<{name}} | " + " ".join(s.ljust(cell) for s in row).rstrip()
                     for r, row in enumerate(rows))
