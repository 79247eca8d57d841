"""trace.py on synthetic events: span timing, gather onto one clock, bubble arithmetic,
wall-time Gantt, summary, PNG (skipped without matplotlib). Serial, no MPI."""
import sys

import pytest

from minipar import trace
from minipar.parallel import schedules
from minipar.parallel.schedules import Event

pytestmark = pytest.mark.pp


def fake_clock(*times):
    """A clock returning the given times in order (the first one becomes the tracer's t0)."""
    return iter(times).__next__


class Recorder:
    """A one-rank stand-in for Group that keeps what each tracer contributes."""
    def __init__(self):
        self.sent = []

    def allgather_object(self, obj):
        self.sent.append(obj)
        return [obj]


class Replay:
    """A stand-in for Group whose allgather returns every rank's recorded contribution."""
    def __init__(self, sent):
        self.sent = sent

    def allgather_object(self, obj):
        return self.sent


def as_seconds(events, unit=1e-3):
    return [e._replace(start=e.start * unit, end=e.end * unit) for e in events]


def test_span_stamps_times_relative_to_t0_even_on_error():
    tracer = trace.Tracer(1, clock=fake_clock(100.0, 100.25, 100.75, 101.0, 101.5))
    with tracer.span("F", 3):
        pass
    with pytest.raises(ZeroDivisionError):
        with tracer.span("B", 3, chunk=1):
            1 / 0
    tracer.record("W", 3, 0, 2.0, 2.5)
    assert tracer.events == [Event(1, "F", 3, 0, 0.25, 0.75), Event(1, "B", 3, 1, 1.0, 1.5),
                             Event(1, "W", 3, 0, 2.0, 2.5)]


def test_gather_puts_every_rank_on_the_earliest_t0():
    tracers = [trace.Tracer(0, clock=fake_clock(10.0)), trace.Tracer(1, clock=fake_clock(10.5))]
    tracers[1].record("F", 0, 0, 0.0, 1.0)      # started 0.5 s after rank 0's t0
    tracers[0].record("B", 0, 0, 2.0, 3.0)
    tracers[0].record("F", 0, 0, 0.0, 0.5)
    recorder = Recorder()
    assert tracers[0].gather(recorder) == sorted(tracers[0].events, key=lambda e: e.start)
    tracers[1].gather(recorder)
    assert tracers[0].gather(Replay(recorder.sent)) == [
        Event(0, "F", 0, 0, 0.0, 0.5), Event(0, "B", 0, 0, 2.0, 3.0), Event(1, "F", 0, 0, 0.5, 1.5)]
    assert tracers[0].gather(Replay(recorder.sent), shared_clock=False)[-1] == Event(1, "F", 0, 0, 0.0, 1.0)


def test_measured_bubble_arithmetic():
    events = [Event(0, "F", 0, 0, 0.0, 1.0), Event(0, "B", 0, 0, 1.0, 2.0),
              Event(1, "F", 0, 0, 1.0, 1.5), Event(1, "RECV_F", 0, 0, 0.0, 1.0)]  # waits are not work
    assert trace.measured_bubble(events, 2) == pytest.approx(1 - 2.5 / (2 * 2.0))
    assert trace.measured_bubble([Event(0, "F", 0, 0, 5.0, 6.0)], 1) == 0.0


def test_wall_time_gantt_buckets_into_the_logical_chart():
    logical = schedules.simulate(schedules.one_f_one_b(4, 8), 4)
    chart = trace.ascii_gantt(as_seconds(logical), 4, width=22).splitlines()
    assert chart[0] == "22.000 ms in 22 columns, 1.000 ms each"
    assert chart[1:] == schedules.ascii_gantt(logical, 4).splitlines()
    assert [line.split(" |")[0] for line in chart[1:]] == ["rank 0", "rank 1", "rank 2", "rank 3"]
    coarse = trace.ascii_gantt(as_seconds(logical), 4, width=11).splitlines()
    assert len(coarse) == 5 and coarse[1].split("| ")[1].split()[:2] == ["F1", "F3"]


@pytest.mark.parametrize("name,m,v", [("1f1b", 8, 1), ("zb-h1", 8, 1), ("interleaved", 8, 2)])
def test_summary_sets_measured_logical_and_formula_side_by_side(name, m, v):
    p = 4
    actions = schedules.make_schedule(name, p, m, v)
    measured = as_seconds(schedules.simulate(actions, p, v))     # a perfectly even run
    s = trace.summary(measured, p, name, m, v, actions=actions)
    expected = float(schedules.bubble_formula(name, p, m, v))
    assert s["bubble"]["logical"] == expected
    assert s["bubble"]["formula"] == expected
    assert s["bubble"]["measured"] == pytest.approx(expected, rel=1e-12)
    assert s["makespan_s"] == pytest.approx(1e-3 * m * v * (3 if name == "zb-h1" else 2) / (1 - expected))
    assert s["per_rank_busy_s"] == pytest.approx([1e-3 * m * v * (3 if name == "zb-h1" else 2)] * p)
    last = max(measured, key=lambda e: e.end)                    # a late straggler widens the bubble
    late = [e._replace(start=e.start + 1e-3, end=e.end + 1e-3) if e == last else e for e in measured]
    assert trace.summary(late, p, name, m, v)["bubble"]["measured"] > expected


def test_save_png_draws_a_file(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "gantt.png"
    trace.save_png(as_seconds(schedules.simulate(schedules.zb_h1(4, 8), 4)), str(path), "ZB-H1 p=4 m=8")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_png_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.patches"):
        monkeypatch.setitem(sys.modules, module, None)      # makes importing it fail
    with pytest.raises(ImportError, match=r"pip install minipar\[plot\]"):
        trace.save_png([Event(0, "F", 0, 0, 0.0, 1.0)], str(tmp_path / "x.png"))
