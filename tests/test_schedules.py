"""Schedules as data: the properties every pipeline schedule must have, checked for
GPipe, 1F1B, interleaved 1F1B and ZB-H1 over hypothesis-drawn (p, m, v). Serial, no MPI."""
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from minipar.layout import SCHEDULES
from minipar.parallel.pipeline import schedules
from minipar.parallel.pipeline.schedules import (COMPUTE_OPS, Action, Event, ascii_gantt,
                                        bubble_formula, bubble_fraction, gpipe, held_until_w_peak,
                                        in_flight_peak, interleaved, make_schedule, one_f_one_b,
                                        peer, simulate, zb_h1)

pytestmark = pytest.mark.pp
EXAMPLES = settings(max_examples=60, deadline=None)


@st.composite
def configs(draw, names=SCHEDULES):
    """(name, p, m, v) with p in 1..8, m in 1..16, v in 1..4 where the schedule allows."""
    name = draw(st.sampled_from(names))
    p = draw(st.integers(1, 8))
    if name != "interleaved":
        return name, p, draw(st.integers(1, 16)), 1
    return name, p, p * draw(st.integers(1, 16 // p)), draw(st.integers(1, 4))


def all_valid_configs():
    for name in SCHEDULES:
        for p in range(1, 9):
            for m in range(1, 17):
                for v in range(1, 5) if name == "interleaved" else (1,):
                    if name != "interleaved" or m % p == 0:
                        yield name, p, m, v


def check_dependencies(events, p, v):
    """Raise AssertionError unless the timed events respect the data flow: F walks the
    virtual stages up, B walks them down after the last stage's F, W follows its B, and
    a rank runs one action at a time."""
    end = {(e.op, e.mb, e.chunk * p + e.rank): e.end for e in events}
    last = p * v - 1
    for e in events:
        s = e.chunk * p + e.rank
        needs = {"F": [("F", e.mb, s - 1)] if s > 0 else [],
                 "B": [("B", e.mb, s + 1) if s < last else ("F", e.mb, s), ("F", e.mb, s)],
                 "W": [("B", e.mb, s)]}[e.op]
        for need in needs:
            assert end[need] <= e.start, f"{e} starts before {need} ended at {end[need]}"
    for r in range(p):
        mine = sorted((e.start, e.end) for e in events if e.rank == r)
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:])), f"rank {r} overlaps itself"


@EXAMPLES
@given(configs())
def test_each_microbatch_runs_once_per_chunk(cfg):
    name, p, m, v = cfg
    expected = Counter((op, mb, c) for mb in range(m) for c in range(v)
                       for op in ("F", "B", "W") if op != "W" or name == "zb-h1")
    for actions in make_schedule(name, p, m, v):
        assert Counter((a.op, a.mb, a.chunk) for a in actions if a.op in COMPUTE_OPS) == expected


@EXAMPLES
@given(configs())
def test_forward_before_backward_before_weight_grad_on_each_rank(cfg):
    name, p, m, v = cfg
    for actions in make_schedule(name, p, m, v):
        position = {(a.op, a.mb, a.chunk): i for i, a in enumerate(actions)}
        for (op, mb, c), i in position.items():
            if op == "B":
                assert position[("F", mb, c)] < i
            if op == "W":
                assert position[("B", mb, c)] < i


@EXAMPLES
@given(configs(), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_simulation_respects_dependencies_for_any_durations(cfg, tf, tb, tw):
    name, p, m, v = cfg
    events = simulate(make_schedule(name, p, m, v), p, v, {"F": tf, "B": tb, "W": tw})
    check_dependencies(events, p, v)


def test_catches_an_early_start():
    events = simulate(one_f_one_b(2, 2), 2)
    early = [e._replace(start=e.start - 1, end=e.end - 1) if (e.rank, e.op, e.mb) == (0, "B", 1) else e
             for e in events]
    with pytest.raises(AssertionError, match="starts before"):
        check_dependencies(early, 2, 1)


@EXAMPLES
@given(configs())
def test_messages_wrap_compute_and_pair_up_between_neighbours(cfg):
    name, p, m, v = cfg
    schedule = make_schedule(name, p, m, v)
    last = p * v - 1
    sends, recvs = Counter(), Counter()
    for rank, actions in enumerate(schedule):
        for i, a in enumerate(actions):
            s = a.chunk * p + rank
            before, after = actions[i - 1] if i else None, actions[i + 1] if i + 1 < len(actions) else None
            if a.op == "F":   # RECV_F right before, SEND_F right after, except at the ends
                assert (before == Action("RECV_F", a.mb, a.chunk)) == (s > 0)
                assert (after == Action("SEND_F", a.mb, a.chunk)) == (s < last)
            if a.op == "B":   # RECV_B right before, SEND_B right after
                assert (before == Action("RECV_B", a.mb, a.chunk)) == (s < last)
                assert (after == Action("SEND_B", a.mb, a.chunk)) == (s > 0)
            if a.op.startswith("SEND"):   # message = (kind, mb, receiving virtual stage)
                sends[(a.op[-1], a.mb, s + 1 if a.op == "SEND_F" else s - 1)] += 1
                to_rank, to_chunk = peer(a, rank, p)
                assert to_chunk * p + to_rank == (s + 1 if a.op == "SEND_F" else s - 1)
            if a.op.startswith("RECV"):
                recvs[(a.op[-1], a.mb, s)] += 1
    assert sends == recvs and max(sends.values(), default=1) == 1


@EXAMPLES
@given(configs(), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
def test_simulation_never_deadlocks(cfg, tf, tb, tw):
    name, p, m, v = cfg
    events = simulate(make_schedule(name, p, m, v), p, v, {"F": tf, "B": tb, "W": tw})
    assert len(events) == p * m * v * (3 if name == "zb-h1" else 2)


def test_simulate_reports_deadlock_and_lost_messages():
    rank0, rank1 = gpipe(2, 1)                # rank0 = [F0, SEND_F0, RECV_B0, B0]
    backward_first = rank0[2:] + rank0[:2]    # bug: waits for B0's grad before sending F0
    with pytest.raises(RuntimeError, match="deadlock: .*rank 0 at RECV_B0.*rank 1 at RECV_F0"):
        simulate([backward_first, rank1], 2)
    with pytest.raises(RuntimeError, match="never received"):
        simulate([[Action("F", 0), Action("SEND_F", 0)], [Action("F", 0)]], 2)


@EXAMPLES
@given(configs())
def test_in_flight_peaks(cfg):
    name, p, m, v = cfg
    peaks = [in_flight_peak(actions) for actions in make_schedule(name, p, m, v)]
    expected = {"gpipe": [m] * p,
                "1f1b": [min(p - r, m) for r in range(p)],
                "zb-h1": [min(p - r, m) for r in range(p)],
                "interleaved": [min(v * p - r, v * m) for r in range(p)]}[name]
    assert peaks == expected
    if name in ("1f1b", "zb-h1"):
        assert max(peaks) <= p
    # F to weight gradient (W for ZB-H1, B otherwise): ZB-H1 lets W's wait on later ranks,
    # but never past p micro-batches, the most 1F1B holds (on rank 0): the paper's memory claim
    held = [held_until_w_peak(actions) for actions in make_schedule(name, p, m, v)]
    if name == "zb-h1":
        assert held == [min(p, m)] * p
    elif name != "interleaved":
        assert held == peaks


def test_measured_bubble_equals_formula_for_every_valid_config():
    for name, p, m, v in all_valid_configs():
        events = simulate(make_schedule(name, p, m, v), p, v)
        assert bubble_fraction(events, p) == bubble_formula(name, p, m, v), (name, p, m, v)


def test_catches_eager_weight_grads():
    # ZB-H1 with each W run right after its own B (no deferral) keeps 1F1B's bubble shape:
    # the exact-equality check must notice.
    p, m = 4, 8
    eager = []
    for actions in zb_h1(p, m):
        out, pending = [], []
        for a in actions:
            if a.op == "W":
                continue
            if a.op in ("F", "B", "RECV_F", "RECV_B"):
                out, pending = out + pending, []
            out.append(a)
            if a.op == "B":
                pending = [Action("W", a.mb)]
        eager.append(out + pending)
    assert bubble_fraction(simulate(eager, p), p) > bubble_formula("zb-h1", p, m)


@EXAMPLES
@given(configs(["gpipe", "1f1b", "interleaved"]), st.integers(1, 4), st.integers(1, 4))
def test_non_split_bubble_formula_holds_for_any_forward_backward_ratio(cfg, tf, tb):
    name, p, m, v = cfg
    events = simulate(make_schedule(name, p, m, v), p, v, {"F": tf, "B": tb})
    assert bubble_fraction(events, p) == bubble_formula(name, p, m, v)


def test_zb_h1_formula_is_the_papers_when_m_at_least_p():
    for p in range(1, 9):
        for m in range(1, 17):
            paper = bubble_formula("zb-h1", p, m, paper=True)
            assert (bubble_formula("zb-h1", p, m) == paper) == (m >= p)


@EXAMPLES
@given(st.integers(1, 8), st.integers(1, 16))
def test_zb_h1_bubble_below_1f1b_with_the_same_work_per_microbatch(p, m):
    # Same work per micro-batch, 3 units: ZB-H1 runs F=1, B=1 (input grad), W=1 (weight
    # grad); 1F1B runs F=1 and its full backward B = input grad + weight grad = 2.
    zb = simulate(zb_h1(p, m), p, durations={"F": 1, "B": 1, "W": 1})
    ofob = simulate(one_f_one_b(p, m), p, durations={"F": 1, "B": 2})
    busy = [sum(e.end - e.start for e in ev if e.rank == 0) for ev in (zb, ofob)]
    assert busy == [3 * m, 3 * m]
    if p > 1:
        assert bubble_fraction(zb, p) < bubble_fraction(ofob, p)
    else:
        assert bubble_fraction(zb, p) == bubble_fraction(ofob, p) == 0


@EXAMPLES
@given(configs(["interleaved"]))
def test_interleaving_shrinks_the_bubble(cfg):
    _, p, m, v = cfg
    # one chunk's F is 1/v of a stage's, so both runs do the same work per micro-batch
    inter = bubble_fraction(simulate(interleaved(p, m, v), p, v), p)
    ofob = bubble_fraction(simulate(one_f_one_b(p, m), p), p)
    assert inter < ofob if (v > 1 and p > 1) else inter == ofob


def test_interleaved_with_one_chunk_is_1f1b():
    for p in range(1, 9):
        for m in range(p, 17, p):
            assert interleaved(p, m, 1) == one_f_one_b(p, m)


@pytest.mark.parametrize("call", [
    lambda: gpipe(0, 4), lambda: one_f_one_b(4, 0), lambda: zb_h1(2.0, 4),
    lambda: interleaved(4, 6, 2), lambda: interleaved(4, 8, 0),
    lambda: make_schedule("1f1b", 4, 8, v=2), lambda: make_schedule("pipedream", 4, 8),
    lambda: bubble_formula("interleaved", 3, 4, 2), lambda: Action("X", 0),
])
def test_invalid_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_action_str_and_gantt_layout():
    assert (str(Action("F", 3)), str(Action("B", 3, 1))) == ("F3", "B3.1")
    chart = ascii_gantt(simulate(one_f_one_b(4, 8), 4), 4)
    rows = chart.splitlines()
    assert len(rows) == 4 and all(row.startswith(f"rank {r} | ") for r, row in enumerate(rows))
    rank0 = "F0 F1 F2 F3 . . . B0 F4 B1 F5 B2 F6 B3 F7 B4 . B5 . B6 . B7"
    assert rows[0].split("| ")[1].split() == rank0.split()
    assert rows[3].split("| ")[1].split()[:5] == [".", ".", ".", "F0", "B0"]
    chunked = ascii_gantt(simulate(interleaved(2, 2, 2), 2, 2), 2)
    assert "F0.0" in chunked and "B1.1" in chunked
    assert ascii_gantt([Event(0, "F", 0, 0, 0, 4)], 1, width=2) == "rank 0 | F0 F0"


def test_module_docstring_chart_is_current():
    documented = [line.strip() for line in schedules.__doc__.splitlines() if " | " in line]
    assert documented == ascii_gantt(simulate(one_f_one_b(4, 8), 4), 4).splitlines()
