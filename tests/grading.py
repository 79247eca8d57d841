"""The grader's collector (a pytest plugin, registered by conftest.py): parts and properties.

    pytest -m "tp and not mpi" --grade-json reports/grade/tp.serial.json --grade-part tp

PART: every marker in setup.cfg except mpi, gpu and slow (core, dp, tp, pp, zero, offload,
3d, and whatever a new strategy registers). Every test must carry at least one: a test
that belongs to no part is refused at collection, so no `make test-<part>` can miss it.

PROPERTY: one test function, with all its parametrized cases and hypothesis examples. A
property passes when every case does. A failing one is ONE line naming the cause:

    the parity check's own message (minipar/parity.py names the likely mistake),
    a collective verdict's first failing rank, or an exception with its test line;
    a bug-zoo test `test_catches_<mistake>` that fails says the mistake went uncaught.

Printed at the end of every run ("failing properties"), and with --grade-json written
as JSON (after every test, so a run killed half-way still leaves what it saw) for
tests/grade.py, which turns the parts into a Gradescope results.json.
"""
import configparser
import json
import os
import re

import pytest

NOT_PARTS = ("mpi", "gpu", "slow", "notebook")   # markers that say how a test runs, not what it grades
RUN_APART = ("notebook",)   # tests run by their own target (make test-notebooks), in no graded part
MAX_CAUSE = 400                      # characters of one cause line


def part_markers(config):
    """The parts: every marker registered in setup.cfg but mpi, gpu and slow, in file order
    (the ini file's own lines: plugins register markers such as skip and timeout too)."""
    ini = configparser.ConfigParser(interpolation=None)
    if config.inipath is None or not ini.read(config.inipath):
        return []
    section = "tool:pytest" if ini.has_section("tool:pytest") else "pytest"
    lines = ini.get(section, "markers", fallback="").splitlines()
    names = [line.split(":")[0].strip() for line in lines]
    return [n for n in names if n and n not in NOT_PARTS]


def readable(function_name):
    """test_catches_f_backward_without_all_reduce -> 'catches f backward without all reduce'."""
    return re.sub(r"^test_", "", function_name).replace("_", " ")


def one_line(text):
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_CAUSE else text[:MAX_CAUSE - 3] + "..."


def cause_key(cause):
    """A cause without its numbers and evidence: two cases fail for the same reason when equal."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", re.sub(r"\[.*\]|\(tp=[^)]*\)|\(step[^)]*\)", "", cause))


def distinct_causes(causes):
    return len({cause_key(c) for c in causes})


def cause_of(item, exc):
    """The one line that says why this case failed."""
    name = type(exc).__name__
    text = str(exc)
    if "DID NOT RAISE" in text and item.originalname.startswith("test_catches_"):
        mistake = readable(item.originalname[len("test_catches_"):])
        return f"the mistake '{mistake}' went uncaught: the check passed with it planted"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if name == "VerdictError" and len(lines) > 1 and lines[0].endswith("failed:"):
        # "k of n ranks of group 'g' failed:" then one line per rank: keep the first rank's
        return one_line(f"{lines[1]} ({lines[0][:-len(' failed:')]} failed)")
    if name in ("ParityError", "VerdictError", "Failed"):
        return one_line(" ".join(lines))
    where = ""
    tb = exc.__traceback__
    while tb is not None:                    # the innermost frame in a test file
        if os.path.basename(tb.tb_frame.f_code.co_filename).startswith("test_"):
            where = f" ({os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"
        tb = tb.tb_next
    return one_line(f"{name}: {lines[0] if lines else ''}{where}")


class Property:
    def __init__(self, item, parts):
        self.module = item.module.__name__
        self.function = item.originalname
        self.name = readable(item.originalname)
        self.parts = [p for p in parts if p in item.keywords]
        self.outcomes, self.causes = {}, []      # nodeid -> passed | failed | skipped

    def record(self, item, call, report):
        """One phase of one case: a failure in any phase fails the case; a skip at setup skips it."""
        if report.failed:
            exc = call.excinfo.value if call.excinfo is not None else None
            cause = cause_of(item, exc) if exc is not None else one_line(report.longreprtext)
            if self.outcomes.get(item.nodeid) != "failed":
                self.causes.append(cause if call.when == "call" else f"in {call.when}: {cause}")
            self.outcomes[item.nodeid] = "failed"
        elif item.nodeid not in self.outcomes:
            self.outcomes[item.nodeid] = "skipped" if report.skipped else "passed"

    @property
    def cases(self):
        return len(self.outcomes)

    @property
    def failed(self):
        return sum(1 for o in self.outcomes.values() if o == "failed")

    @property
    def skipped(self):
        return sum(1 for o in self.outcomes.values() if o == "skipped")

    def as_dict(self):
        return {"module": self.module, "function": self.function, "name": self.name, "parts": self.parts,
                "cases": self.cases, "failed": self.failed, "skipped": self.skipped, "causes": self.causes}

    def line(self):
        """The failing property in one line: its name, how many cases fail, the first cause."""
        first, others = self.causes[0], distinct_causes(self.causes) - 1
        more = f" (+{others} other cause{'s' if others > 1 else ''})" if others else ""
        count = f"{self.failed} of {self.cases} cases" if self.cases > 1 else "fails"
        return f"{self.name} [{self.module}] {count}: {first}{more}"


class Grading:
    """Collects each property's outcome; rank 0 writes and prints (ranks > 0 are silenced)."""

    def __init__(self, config, rank):
        self.config, self.rank = config, rank
        self.path = config.getoption("grade_json")
        self.part = config.getoption("grade_part")
        self.parts = part_markers(config)
        self.properties = {}
        self.collected, self.complete, self.running = 0, False, None

    def pytest_collection_modifyitems(self, items):
        if not self.parts:          # a project (or a test of the harness) that defines no parts
            return
        orphans = [item.nodeid for item in items if not any(p in item.keywords for p in self.parts)
                   and not any(m in item.keywords for m in RUN_APART)]
        if orphans:
            raise pytest.UsageError(
                f"{len(orphans)} test(s) belong to no part; mark each with one of {self.parts} "
                f"(pytestmark = pytest.mark.<part>): " + ", ".join(orphans[:5]))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        if call.when == "call" or report.failed or report.skipped:
            key = f"{item.module.__name__}::{item.originalname}"
            prop = self.properties.get(key) or self.properties.setdefault(key, Property(item, self.parts))
            prop.record(item, call, report)
            self.write()
        return report

    def pytest_collection_finish(self, session):
        self.collected = len(session.items)
        self.write()

    def pytest_runtest_logstart(self, nodeid, location):
        self.running = nodeid                # what a run that dies half-way was doing
        self.write()

    def pytest_sessionfinish(self, session, exitstatus):
        self.running, self.complete = None, True
        self.write()

    def write(self):
        if not self.path or self.rank != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"part": self.part, "collected": self.collected, "complete": self.complete,
                       "running": self.running,
                       "properties": [p.as_dict() for p in self.properties.values()]}, f, indent=1)
        os.replace(tmp, self.path)

    def pytest_terminal_summary(self, terminalreporter):
        failing = [p for p in self.properties.values() if p.failed]
        if not self.properties:
            return
        passed = sum(1 for p in self.properties.values() if not p.failed)
        terminalreporter.section(f"properties: {passed} of {len(self.properties)} hold", sep="-")
        for prop in failing:
            terminalreporter.write_line("FAIL " + prop.line())


def addoption(parser):
    group = parser.getgroup("grading", "the grader (tests/grading.py, make grade)")
    group.addoption("--grade-json", default=None, metavar="PATH",
                    help="write each property's outcome as JSON to PATH (rank 0)")
    group.addoption("--grade-part", default=None, metavar="PART",
                    help="the part this run grades (a marker: core, dp, tp, ...), recorded in the JSON")
