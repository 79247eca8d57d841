"""Test harness: one suite, run serially or with every MPI rank running every test.

    pytest -m "not mpi"                                        # the serial part
    mpiexec -n 8 python -m mpi4py -m pytest -m mpi             # the MPI part

Under MPI, a failure must never leave ranks waiting for each other:
- assertions are collective verdicts (minipar.parity): all ranks agree;
- hypothesis is derandomized (below), so every rank draws the same examples;
- after each test, and each hypothesis example, the ranks compare outcomes on a
  private communicator, so hypothesis shrinks in step on every rank. A test
  that failed on some ranks only is failed on all, so rank 0's summary tells
  the truth; a rank that raised while the others are stuck in a collective
  prints its traceback and aborts the job after `mpi_abort_grace` seconds;
- a stalled test is ended by pytest-timeout (setup.cfg): its thread method
  calls os._exit, and mpiexec then tears the whole job down.
Ranks > 0 print only their own failures, so the output reads like a serial run.
"""
import functools
import os
import sys
import time
import traceback

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

import grading
from minipar.comm.grid import ProcessGrid
from minipar.comm.group import CommLedger, Group
from minipar.parity import VerdictError

# every rank must draw the same examples: derandomized, no example database, no deadline
# (timing differs between ranks), and no timing-based health check
settings.register_profile("minipar", parent=settings.get_profile("ci"), derandomize=True,
                          database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# the grader's (tests/grade.py passes --hypothesis-profile=minipar-grade): the first failing
# example is the verdict; shrinking it (many more training runs) would outlast the per-test timeout
settings.register_profile("minipar-grade", parent=settings.get_profile("minipar"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile("minipar")

PASSED, VERDICT, RAISED = 0, 1, 2   # a rank's outcome of one test, compared after it
REAL_STDOUT = pytest.StashKey()


def pytest_addoption(parser):
    parser.addini("mpi_abort_grace", "seconds a rank whose test raised waits for the other ranks "
                  "before aborting the MPI job", default="10")
    # --device: run the suite on NumPy (cpu), on minipar.strict (a CPU stand-in that enforces
    # CuPy's no-implicit-host-transfer rules) or on CuPy (gpu); see the device fixture
    parser.addoption("--device", default="cpu", choices=("cpu", "strict", "gpu"),
                     help="array backend for the Engines the tests build")
    grading.addoption(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    world = Group.world(ledger=CommLedger())
    # parts and properties: every test belongs to a part; failures summed up one line per property
    config.pluginmanager.register(grading.Grading(config, world.rank), "minipar-grading")
    if world.size == 1:
        return
    config.pluginmanager.register(MpiHarness(config, world.dup("harness")), "minipar-mpi-harness")
    if world.rank > 0:
        # pytest's terminal reporter is built next, around sys.stdout: give it /dev/null
        config.stash[REAL_STDOUT] = sys.stdout
        sys.stdout = open(os.devnull, "w")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    if REAL_STDOUT in session.config.stash:  # the terminal reporter exists by now
        sys.stdout = session.config.stash[REAL_STDOUT]


def pytest_collection_modifyitems(config, items):
    if Group.world().size == 1:
        skip = pytest.mark.skip(reason="needs MPI ranks: mpiexec -n 8 python -m mpi4py -m pytest -m mpi")
        for item in items:
            if "mpi" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def world():
    """Every rank of the job, with a ledger of its own."""
    return Group.world(ledger=CommLedger())


@pytest.fixture(scope="session")
def group_of(world):
    """group_of(n): this rank's block of n consecutive ranks; each block runs the test on its own."""
    blocks = {}

    def make(n):
        if n > world.size or world.size % n:
            pytest.skip(f"needs a multiple of {n} ranks, the job has {world.size}")
        if n not in blocks:
            blocks[n] = world.split(color=world.rank // n, key=world.rank, name=f"block{n}")
        return blocks[n]
    return make


@pytest.fixture(scope="session")
def grid_of(group_of):
    """grid_of(dp, pp=1, tp=1, cp=1, algorithm="mpi"): a ProcessGrid over this rank's block of
    dp*pp*tp*cp ranks, with a comm ledger of its own. Cached for the session: each grid makes
    several communicators, a finite resource."""
    grids = {}

    def make(dp=1, pp=1, tp=1, cp=1, algorithm="mpi"):
        key = (dp, pp, tp, cp, algorithm)
        if key not in grids:
            block = group_of(dp * pp * tp * cp).using(ledger=CommLedger(), algorithm=algorithm)
            grids[key] = ProcessGrid(block, dp, pp, tp, cp)
        return grids[key]
    return make


@pytest.fixture(scope="session")
def pipeline_group(world):
    """pipeline_group(p): this rank's block of p consecutive ranks, for any p (8 ranks make blocks
    0-2, 3-5 and 6-7); a rank in a leftover block smaller than p skips (the harness counts a
    skip as a pass)."""
    blocks = {}

    def make(p):
        if world.size < p:
            pytest.skip(f"needs {p} ranks")
        if p not in blocks:
            blocks[p] = world.split(color=world.rank // p, key=world.rank, name=f"pipe{p}")
        if blocks[p].size < p:
            pytest.skip(f"ranks {world.rank // p * p}.. form no full {p}-stage pipeline")
        return blocks[p]
    return make


# ----------------------------------------------------------------------------- MPI runs
def _outcome(exc):
    if exc is None or isinstance(exc, (pytest.skip.Exception, pytest.xfail.Exception)):
        return PASSED
    return VERDICT if isinstance(exc, VerdictError) else RAISED


def _short_traceback(exc):
    """The traceback without pytest's and pluggy's own frames."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not any(part in f.filename for part in ("_pytest", "pluggy", "conftest.py"))]
    return ("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
            + "".join(traceback.format_exception_only(exc)))


class MpiHarness:
    """Plugin active when the job has several ranks; `group` is a private copy of world."""

    def __init__(self, config, group):
        self.config, self.group = config, group
        self.outcomes = {}  # nodeid -> every rank's outcome of its call phase

    def say(self, text):
        """Print past pytest's capture (and past a silenced terminal)."""
        with self.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
            sys.__stderr__.write(text)
            sys.__stderr__.flush()

    def exchange_outcomes(self, name, exc):
        """Collective: every rank's outcome (PASSED / VERDICT / RAISED) of this test or example."""
        mine, group = _outcome(exc), self.group
        flags = np.zeros(group.size, np.int64)
        flags[group.rank] = mine
        # n int64 outcome flags over the private communicator: never matches a test's own message
        request = group.iall_reduce_(flags, op="sum")
        if mine == RAISED:
            deadline = time.monotonic() + float(self.config.getini("mpi_abort_grace"))
            while not request.test():
                if time.monotonic() > deadline:
                    self.say(f"\n==== [rank {group.rank}] {name} raised while other ranks are "
                             f"still inside the test: aborting the MPI job ====\n" + _short_traceback(exc))
                    group.abort(1)
                time.sleep(0.01)
        else:
            request.wait()
        return flags

    def compare_outcomes(self, item, exc):
        """Collective: learn every rank's outcome of this test; fail here if another rank failed."""
        flags = self.outcomes[item.nodeid] = self.exchange_outcomes(item.nodeid, exc)
        failed = np.flatnonzero(flags).tolist()
        if failed and _outcome(exc) == PASSED:
            pytest.fail(f"failed on rank(s) {failed} (their reports follow); passed on this rank",
                        pytrace=False)

    def in_lockstep(self, inner_test, name):
        """Wrap a hypothesis test's body so every example ends with the ranks' outcomes compared.
        An example that raised on some ranks only then fails on all of them, so hypothesis
        (derandomized) shrinks in step on every rank instead of running different examples."""
        @functools.wraps(inner_test)
        def example(*args, **kwargs):
            __tracebackhide__ = True      # pytest shows the test's frames, not this wrapper
            try:
                inner_test(*args, **kwargs)
            except Exception as exc:
                self.exchange_outcomes(name, exc)
                raise
            failed = np.flatnonzero(self.exchange_outcomes(name, None)).tolist()
            if failed:
                raise VerdictError(f"this example failed on rank(s) {failed}; passed on this rank")
        example.minipar_lockstep = True
        return example

    def pytest_collection_modifyitems(self, items):
        for item in items:
            hypothesis = getattr(getattr(item, "obj", None), "hypothesis", None)
            if hypothesis is not None and not getattr(hypothesis.inner_test, "minipar_lockstep", False):
                name = f"{item.nodeid.split('[')[0]} (a hypothesis example)"
                hypothesis.inner_test = self.in_lockstep(hypothesis.inner_test, name)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        try:
            result = yield
        except (Exception, pytest.skip.Exception, pytest.fail.Exception) as exc:
            self.compare_outcomes(item, exc)
            raise
        self.compare_outcomes(item, None)
        return result

    def show(self, flags):
        """Does this rank (> 0) print its failure? Only if it adds to what rank 0 shows."""
        rank = self.group.rank
        if flags is None or flags[rank] == RAISED:
            return True   # its own traceback (or a setup / teardown failure)
        if flags[rank] == VERDICT:  # the same text on each failing rank: one copy, if rank 0 passed
            return flags[0] == PASSED and rank == np.flatnonzero(flags == VERDICT)[0]
        return False      # it passed: the failing ranks report

    def pytest_unconfigure(self, config):
        # the last collective: no rank leaves (python -m mpi4py aborts the job when pytest
        # exits non-zero) before rank 0 has printed its summary
        sys.stdout.flush()
        self.group.barrier()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        flags = self.outcomes.pop(item.nodeid, None) if call.when == "call" else None
        if self.group.rank > 0 and report.failed and self.show(flags):
            self.say(f"\n==== [rank {self.group.rank}] FAILED {item.nodeid} ({call.when}) ====\n"
                     f"{report.longreprtext}\n")
        return report


@pytest.fixture(scope="session")
def device(request):
    """The --device option (cpu | strict | gpu): every test passes it to each Engine it builds,
    Engine(..., device=device), and to lockstep(..., device=device)."""
    return request.config.getoption("--device")
