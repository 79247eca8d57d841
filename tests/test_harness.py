"""The MPI test harness ends every kind of failure in bounded time, readably.

Each test writes a tiny test file next to a copy of tests/conftest.py and runs it
on 2 ranks: `mpiexec -n 2 python -m mpi4py -m pytest`. Serial (not marked mpi):
it starts its own MPI job.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minipar.comm.group import Group

pytestmark = [pytest.mark.core,
              pytest.mark.skipif(Group.world().size > 1, reason="starts its own MPI jobs: run it serially")]

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
JOB_TIMEOUT = 90   # seconds: under pytest-timeout's 120; each case must end well before this
PER_TEST_TIMEOUT = 5

INI = f"""
[pytest]
markers =
    mpi: needs several MPI ranks
timeout = {PER_TEST_TIMEOUT}
timeout_method = thread
mpi_abort_grace = 2
"""


def run_on_two_ranks(tmp_path, test_source):
    """(exit code, stdout + stderr, seconds) of a 2-rank pytest job over test_source."""
    mpiexec = str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec next to this Python or on PATH")
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(REPO / "tests" / "grading.py", tmp_path / "grading.py")       # conftest's collector
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_case.py").write_text(textwrap.dedent(test_source))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    start = time.monotonic()
    job = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "pytest",
                          "-p", "no:cacheprovider", "-q", "test_case.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    return job.returncode, job.stdout + job.stderr, time.monotonic() - start


def test_a_verdict_failing_on_rank_1_fails_every_rank_and_names_it(tmp_path):
    code, output, seconds = run_on_two_ranks(tmp_path, """
        from minipar.parity import agree

        def test_rank_1_disagrees(world):
            agree(world, world.rank != 1, f"rank {world.rank} computed the wrong thing")

        def test_the_job_goes_on(world):
            world.barrier()
        """)
    assert code != 0, output
    assert "rank 1 (world rank 1): rank 1 computed the wrong thing" in output, output
    assert "1 failed, 1 passed" in output, output
    assert output.count("1 failed, 1 passed") == 1, "ranks > 0 should stay quiet"


def test_a_failure_on_rank_1_only_is_reported_by_rank_0(tmp_path):
    code, output, seconds = run_on_two_ranks(tmp_path, """
        def test_plain_assert_on_rank_1(world):
            assert world.rank != 1, "a plain assert on rank 1"
        """)
    assert code != 0, output
    assert "[rank 1] FAILED" in output and "a plain assert on rank 1" in output, output
    assert "failed on rank(s) [1]" in output, output         # rank 0's summary tells the truth


def test_a_rank_that_stalls_is_killed_by_the_per_test_timeout(tmp_path):
    code, output, seconds = run_on_two_ranks(tmp_path, """
        import time

        def test_rank_1_sleeps_forever(world):
            if world.rank == 1:
                time.sleep(10_000)
            world.barrier()
        """)
    assert code != 0, output
    assert "Timeout" in output, output
    assert seconds < PER_TEST_TIMEOUT + 30, f"took {seconds:.0f} s"


def test_a_rank_that_raises_while_others_wait_aborts_the_job(tmp_path):
    code, output, seconds = run_on_two_ranks(tmp_path, """
        def test_rank_1_raises(world):
            if world.rank == 1:
                raise RuntimeError("boom on rank 1")
            world.barrier()    # rank 0 would wait here forever

        def test_never_reached(world):
            world.barrier()
        """)
    assert code != 0, output
    assert "boom on rank 1" in output and "aborting the MPI job" in output, output
    assert seconds < PER_TEST_TIMEOUT + 30, f"took {seconds:.0f} s"


def test_a_hypothesis_example_failing_on_rank_1_only_is_shrunk_in_step(tmp_path):
    """Rank 1 raises for x > 5 after the test's last collective, so rank 0 passes those
    examples. Each example's outcome is compared, so both ranks fail it and shrink alike: the
    job reports one falsifying example, x = 6, and goes on to the next test."""
    code, output, seconds = run_on_two_ranks(tmp_path, """
        from hypothesis import given, strategies as st

        @given(st.integers(0, 20))
        def test_rank_1_raises_on_big_numbers(world, x):
            world.barrier()
            if world.rank == 1 and x > 5:
                raise ValueError(f"rank 1 cannot take {x}")

        def test_the_job_goes_on(world):
            world.barrier()
        """)
    assert code != 0, output
    assert "rank 1 cannot take 6" in output and "failed on rank(s) [1]" in output, output
    assert "x=6" in output and "1 failed, 1 passed" in output, output
    assert "aborting the MPI job" not in output, output
