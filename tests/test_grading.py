"""The grader (tests/grading.py, tests/grade.py): parts, properties, one-line causes, blocking.

Serial and synthetic: no pytest run inside pytest, no MPI. `make grade` itself is what
the README's course-staff section runs (measured there).
"""
import json
import re
from pathlib import Path

import pytest

import grade
import grading

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parents[1]


def makefile_parts():
    text = (REPO / "Makefile").read_text()
    strategies = re.search(r"^STRATEGIES\s*:=(.*)$", text, re.M).group(1).split()
    parts = re.search(r"^PARTS\s*:=(.*)$", text, re.M).group(1).replace("$(STRATEGIES)", " ".join(strategies))
    return parts.split()


def test_every_part_marker_has_a_make_target_and_back(pytestconfig):
    """A new strategy is graded once it has a marker in setup.cfg and a name in STRATEGIES."""
    assert sorted(grading.part_markers(pytestconfig)) == sorted(makefile_parts())


def test_names_read_as_sentences():
    assert grading.readable("test_catches_f_backward_without_all_reduce") == "catches f backward without all reduce"


class FakeItem:
    originalname = "test_catches_sum_not_mean"


def test_an_uncaught_mistake_says_so():
    cause = grading.cause_of(FakeItem(), pytest.fail.Exception("DID NOT RAISE <class 'ParityError'>"))
    assert cause == "the mistake 'sum not mean' went uncaught: the check passed with it planted"


def test_a_verdict_keeps_its_first_failing_rank_on_one_line():
    from minipar.parity import VerdictError
    exc = VerdictError("2 of 4 ranks of group 'tp' failed:\n  rank 0 (world rank 0): f differs\n  rank 1 ...")
    assert grading.cause_of(FakeItem(), exc) == "rank 0 (world rank 0): f differs (2 of 4 ranks of group 'tp' failed)"


def test_causes_that_differ_only_in_numbers_count_once():
    a = "parity failed (tp=2, step 0): every differing gradient is 2x the serial one [grad: rel err 1e+00]"
    b = "parity failed (tp=4, step 1): every differing gradient is 4x the serial one [grad: rel err 3e-01]"
    assert grading.distinct_causes([a, b]) == 1
    assert grading.distinct_causes([a, "AssertionError: x"]) == 2


def prop(name, parts, failed):
    return {"module": "m", "function": name, "name": name, "parts": parts, "cases": 1,
            "failed": int(failed), "skipped": 0, "causes": ["why"] if failed else []}


def test_a_mistake_in_tp_costs_the_tp_part_alone():
    """tp fails on its own; the 3d part's failing tests (3d builds on tp) and a core test that
    also carries the 3d marker are blocked by tp: reported, not scored."""
    graded = {"core": [prop("ops", ["core"], False), prop("resume", ["core", "3d"], True)],
              "tp": [prop("f", ["tp"], True), prop("heads", ["tp"], False)],
              "3d": [prop("matrix", ["3d"], True), prop("resume", ["core", "3d"], True)],
              "dp": [prop("ddp", ["dp"], False)]}
    deps = grade.parse_builds_on("3d:dp,tp", list(graded))
    assert grade.blockers("tp", graded["tp"][0], graded, deps) == set()
    assert grade.blockers("3d", graded["3d"][0], graded, deps) == {"tp"}
    assert grade.roots("3d", graded, deps) == {"tp"}
    assert grade.roots("core", graded, deps) == {"tp"}            # via the resume test's 3d marker
    entry = grade.entry("3d", graded["3d"][0], {"tp"})
    assert (entry["score"], entry["max_score"], entry["status"]) == (0, 0, "failed")
    assert entry["output"].startswith("not scored: blocked by the failing part tp")
    assert grade.entry("tp", graded["tp"][0])["max_score"] == 1


def test_a_broken_core_blocks_every_other_part():
    graded = {"core": [prop("autograd", ["core"], True)], "dp": [prop("ddp", ["dp"], True)]}
    deps = grade.parse_builds_on("", list(graded))
    assert grade.blockers("core", graded["core"][0], graded, deps) == set()
    assert grade.blockers("dp", graded["dp"][0], graded, deps) == {"core"}


def test_results_are_gradescope_json_with_one_entry_per_property_per_part():
    graded = {"core": [prop("ops", ["core"], False)], "tp": [prop("f", ["tp"], True), prop("g", ["tp"], False)],
              "3d": [prop("matrix", ["3d"], True)]}
    results, lines = grade.build_results(graded, {"core": 1.0, "tp": 2.0, "3d": 3.0},
                                         grade.parse_builds_on("3d:tp", list(graded)), list(graded), 6.0)
    assert json.loads(json.dumps(results)) == results
    assert [t["name"] for t in results["tests"]] == ["core: ops [m]", "tp: f [m]", "tp: g [m]", "3d: matrix [m]"]
    for t in results["tests"]:
        assert {"name", "score", "max_score", "status", "output"} <= set(t) and t["status"] in ("passed", "failed")
    assert results["score"] == 2 and sum(t["max_score"] for t in results["tests"]) == 3   # 3d blocked by tp
    assert "   FAIL f [m]: fails: why" in lines and any(line.startswith("   BLOCKED matrix") for line in lines)
    assert lines[-1].startswith("total       2/3")
