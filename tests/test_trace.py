"""trace.py on synthetic events: span timing, gather onto one clock, bubble arithmetic,
wall-time Gantt, summary, PNG (skipped without matplotlib), and the Chrome trace-event JSON
checked against the format's required fields. Serial (one-rank groups only)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minipar.parallel.pipeline import trace
from minipar.comm.group import CommEntry, CommLedger, Group
from minipar.parallel.pipeline import schedules
from minipar.parallel.pipeline.schedules import Event

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


# ---- Chrome trace-event JSON (--trace out.json) -------------------------------------------
PHASES = {"X", "B", "E", "i", "I", "M", "C", "b", "e", "n", "s", "t", "f"}    # the format's phases in use
METADATA = {"process_name", "thread_name", "process_sort_index", "thread_sort_index", "process_labels"}


def check_trace_event_format(doc):
    """The Trace Event Format's required fields (the JSON Object Format): a "traceEvents"
    list; every event has name (str), ph (a known phase), ts (µs, a number), pid and tid
    (ints); complete events ('X') a dur >= 0; metadata events ('M') a known name and args.
    Every track that has events is named, as is every process."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list) and doc["traceEvents"]
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    named_threads, named_processes, used = set(), set(), set()
    for e in doc["traceEvents"]:
        assert isinstance(e["name"], str) and e["ph"] in PHASES, e
        assert isinstance(e["ts"], (int, float)) and not isinstance(e["ts"], bool), e
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int), e
        if e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0 and e["ts"] >= 0, e
            used.add((e["pid"], e["tid"]))
        if e["ph"] == "M":
            assert e["name"] in METADATA and isinstance(e["args"], dict), e
            if e["name"] == "thread_name":
                named_threads.add((e["pid"], e["tid"]))
            if e["name"] == "process_name":
                named_processes.add(e["pid"])
    assert used <= named_threads and {pid for pid, _ in used} <= named_processes


def synthetic_timeline():
    """Two world ranks of an interleaved pipeline (p = 2, v = 2), at absolute clock 100 s."""
    t = 100.0
    return [{"rank": 0, "coords": (0, 0, 0), "pp": 2, "step": (7, t, t + 0.010),
             "compute": [("F", 0, 0, t + 0.001, t + 0.002), ("F", 0, 1, t + 0.004, t + 0.005),
                         ("SEND_F", 0, 0, t + 0.002, t + 0.0021)],
             "comm": [("isend", "pp", "float64", 64, 512, t + 0.002, t + 0.0021),
                      ("all_reduce", "dp", "float64", 100, 800, t + 0.009, t + 0.0095)]},
            {"rank": 1, "coords": (0, 1, 0), "pp": 2, "step": (7, t + 0.0005, t + 0.010),
             "compute": [("RECV_F", 0, 0, t + 0.001, t + 0.0022), ("F", 0, 0, t + 0.0022, t + 0.003)],
             "comm": [("recv", "pp", "float64", 64, 0, t + 0.001, t + 0.0022)]}]


def test_chrome_trace_has_the_format_s_required_fields_and_one_process_per_rank(tmp_path):
    path = trace.write_chrome_trace(synthetic_timeline(), str(tmp_path / "sub" / "t.json"), "test")
    doc = json.loads(open(path).read())
    check_trace_event_format(doc)
    events = doc["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {e["args"]["name"] for e in events if e["name"] == "process_name"} == \
        {"rank 0 (dp 0, pp 0, tp 0)", "rank 1 (dp 0, pp 1, tp 0)"}
    # rank 0 holds stages 0 and 2 (chunk c of pp rank r is stage c*p + r), rank 1 stage 1
    assert names[(0, 1)] == "stage 0" and names[(0, 2)] == "stage 2 (chunk 1)" and names[(1, 1)] == "stage 1"
    assert names[(0, trace.COMM_TID)] == "communication"
    spans = [e for e in events if e["ph"] == "X"]
    assert min(e["ts"] for e in spans) == 0                         # from the earliest step start
    f = next(e for e in spans if e["pid"] == 0 and e["name"] == "F0" and e["tid"] == 2)
    assert f["ts"] == pytest.approx(4000) and f["dur"] == pytest.approx(1000) and f["args"]["stage"] == 2
    comm = [e for e in spans if e["cat"] == "comm"]
    assert {(e["pid"], e["name"], e["args"]["bytes_sent"]) for e in comm} == \
        {(0, "isend pp", 512), (0, "all_reduce dp", 800), (1, "recv pp", 0)}
    assert all(e["tid"] == trace.COMM_TID for e in comm)


class World1:
    """A one-rank stand-in for the world Group."""
    rank, size = 0, 1


def test_gather_timeline_keeps_the_step_s_window_on_one_clock():
    tracer = trace.Tracer(0, clock=fake_clock(50.0))
    tracer.record("F", 0, 0, 0.5, 0.6)          # before the step (50.5 s): left out
    tracer.record("B", 1, 0, 2.0, 2.5)          # inside: absolute 52.0 .. 52.5
    ledger = CommLedger(clock=fake_clock(51.0, 51.25, 60.0, 61.0))
    group = Group.single(ledger=ledger)
    group.all_reduce(np.ones(3))                # stamped 51.0 .. 51.25
    group.barrier()                             # stamped 60.0 .. 61.0: after the step
    assert ledger.entries[0].start == 51.0 and ledger.entries[0].end == 51.25
    [rank] = trace.gather_timeline(World1(), None, tracer, ledger, (3, 51.0, 53.0))
    assert rank["compute"] == [("B", 1, 0, 52.0, 52.5)]
    assert [c[0] for c in rank["comm"]] == ["all_reduce"] and rank["coords"] is None
    check_trace_event_format(trace.chrome_trace([rank]))        # no pipeline: step + comm tracks


def test_a_ledger_without_a_clock_records_no_times_and_equality_ignores_times():
    group = Group.single(ledger=CommLedger())
    group.all_reduce(np.ones(2))
    [entry] = group.ledger.entries
    assert entry.start is None and entry.end is None
    assert entry == CommEntry("all_reduce", "self", "float64", 2, 0, start=1.0, end=2.0)


def test_train_trace_json_is_written_and_says_where(tmp_path):
    path = tmp_path / "t.json"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "minipar.train", "--steps", "2", "--n-layer", "2", "--n-head", "2",
           "--d-model", "16", "--n-digits", "4", "--batch-size", "8", "--eval-samples", "8", "--trace", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"trace written to {path}" in proc.stdout
    doc = json.loads(path.read_text())
    check_trace_event_format(doc)
    assert any(e["name"] == "step 1" for e in doc["traceEvents"])


def test_gantt_rows_name_stage_and_world_rank_and_labels_fit_or_go():
    assert trace.row_labels((0, 2)) == ["stage 0 · world rank 0", "stage 1 · world rank 2"]
    assert trace.row_labels((4, 6), v=2) == ["stages 0,2 · world rank 4", "stages 1,3 · world rank 6"]
    assert trace.fits("F3", 40, 7, 100) and not trace.fits("F3", 10, 7, 100)
    assert trace.fits("F13", 21, 7, 100) is False and trace.fits("F13", 22, 7, 100) is True  # 2.2 em of 7 pt
