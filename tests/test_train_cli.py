"""The training job from the outside: bad input, faults, reports and checkpoints.

Each test launches `python -m minipar.train` (under mpiexec where it needs
ranks) as a subprocess with a hard timeout, so a hang fails the test instead of
the suite. These are serial tests: they start their own MPI jobs.
"""
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "16", "--n-digits", "4", "--batch-size", "8",
        "--log-every", "1000", "--eval-samples", "16"]


def run(args, n=1, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "minipar.train", *args]
    if n > 1:
        cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "minipar.train", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    return proc, time.perf_counter() - start


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("minipar.train: error:")]


@pytest.mark.parametrize("args", [["--bogus"], ["--steps", "0"], ["--steps", "x"], ["--precision", "fp8"],
                                  ["--data", "/no/such/file.txt"], ["--resume", "/no/such/ckpt"],
                                  ["--dp", "2"], ["--vocab", "4"], ["--n-head", "3", "--d-model", "16"]])
def test_bad_input_is_one_line_and_exit_2(args):
    proc, _ = run(args)
    assert proc.returncode == 2, proc.stderr
    assert len(error_lines(proc)) == 1 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [
    ["--dp", "3"],                                              # product is not the world size
    ["--tp", "4", "--n-head", "2"],                             # heads not divisible by tp
    ["--tp", "4", "--n-head", "4", "--vocab", "18"],            # vocab not divisible by tp
    ["--pp", "4", "--n-layer", "2"],                            # fewer layers than stages
    ["--pp", "2", "--dp", "2", "--schedule", "interleaved", "--micro-batches", "3"],
    ["--dp", "4", "--batch-size", "6"],                         # batch does not split
    ["--tp", "2", "--dp", "2", "--zero", "3"],                  # ZeRO-3 only with pure dp
])
def test_bad_layout_exits_cleanly_on_every_rank(args):
    proc, seconds = run(TINY + args, n=4, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(error_lines(proc)) == 1, proc.stderr            # one line, from rank 0 only
    assert "Traceback" not in proc.stderr
    assert seconds < 30


def test_killed_rank_ends_the_job(tmp_path):
    """A rank that dies mid-run (SIGKILL) ends the whole job: never a hang."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, signal, sys\n"
        "from minipar import engine\n"
        "step = engine.Engine.train_step\n"
        "def dying(self, s, *a):\n"
        "    if s == 3 and self.grid.world.rank == 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self, s, *a)\n"
        "engine.Engine.train_step = dying\n"
        "from minipar.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", str(script), *TINY,
                           "--dp", "2", "--steps", "1000"], capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode != 0
    assert time.perf_counter() - start < 60


def test_report_keys_and_learning(tmp_path):
    report = tmp_path / "r.json"
    proc, _ = run(TINY + ["--steps", "150", "--lr", "1e-2", "--eval-samples", "64", "--report", str(report)])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    for key in ("config", "layout", "optim", "losses", "initial_accuracy", "final_accuracy", "step_time_s",
                "tokens_per_s", "memory", "comm", "bubble", "parity"):
        assert key in data, key
    assert len(data["losses"]) == 150 and data["losses"][-1] < data["losses"][0]
    assert data["final_accuracy"] > 0.5 > data["initial_accuracy"]


def test_check_passes_and_reports_parity(tmp_path):
    report = tmp_path / "r.json"
    proc, _ = run(TINY + ["--steps", "3", "--dp", "2", "--pp", "2", "--check", "--report", str(report)], n=4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parity = json.loads(report.read_text())["parity"]
    assert parity["ok"] and parity["max_rel_err"] < 1e-10
    assert json.loads(report.read_text())["bubble"]["logical"] == pytest.approx(
        json.loads(report.read_text())["bubble"]["formula"])


@getattr(pytest.mark, "3d")           # also a composition test: saved at dp2 x tp2, resumed at pp2
def test_resume_is_bit_identical_and_reshards(tmp_path):
    ck, full, resumed, other = tmp_path / "ck", tmp_path / "full.json", tmp_path / "res.json", tmp_path / "o.json"
    layout = ["--dp", "2", "--tp", "2"]
    proc, _ = run(TINY + layout + ["--steps", "6", "--report", str(full)], n=4)
    assert proc.returncode == 0, proc.stderr
    proc, _ = run(TINY + layout + ["--steps", "3", "--save", str(ck)], n=4)
    assert proc.returncode == 0, proc.stderr
    proc, _ = run(TINY + layout + ["--steps", "6", "--resume", str(ck), "--report", str(resumed)], n=4)
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads(full.read_text())["losses"], json.loads(resumed.read_text())["losses"]
    assert a[3:] == b                                          # bit-identical: the same floats
    proc, _ = run(TINY + ["--pp", "2", "--steps", "6", "--resume", str(ck), "--report", str(other)], n=2)
    assert proc.returncode == 0, proc.stderr                  # saved at dp2 tp2, resumed at pp2
    c = json.loads(other.read_text())["losses"]
    assert max(abs(x - y) for x, y in zip(a[3:], c)) < 1e-10


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    ck = tmp_path / "ck"
    proc, _ = run(TINY + ["--steps", "2", "--save", str(ck)])
    assert proc.returncode == 0 and not list(tmp_path.glob("ck.tmp-*"))   # the rename left nothing behind
    proc, _ = run(TINY + ["--steps", "3", "--d-model", "32", "--resume", str(ck)])
    assert proc.returncode == 2 and "d_model" in proc.stderr
    rank0 = next(ck.glob("rank0*.npz"))
    data = rank0.read_bytes()
    rank0.write_bytes(data[: len(data) // 2])
    proc, _ = run(TINY + ["--steps", "3", "--resume", str(ck)])
    assert proc.returncode == 2 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr
