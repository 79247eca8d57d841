"""Save is atomic at every instant: a save killed at any stage leaves a complete checkpoint.

A real `python -m minipar.train` process checkpoints every 2 steps; its second save is
killed (os._exit, as a power cut would: no cleanup runs) at one of the stages of
minipar/checkpoint.py's table. The directory must still hold one complete, verified
checkpoint (the old one before the commit, the new one after), `--resume` must continue
from it to the uninterrupted run's losses, and the next save must clean what the killed
one left behind.
"""
import json
import os
import subprocess
import sys

import pytest

from minipar.comm.group import CommLedger, Group
from minipar.manifest import read_manifest
from minipar.train import main

pytestmark = pytest.mark.core      # the training job's checkpoints: a core part

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "16", "--n-digits", "4", "--batch-size", "8",
        "--log-every", "1000", "--eval-samples", "16"]
KILLER = """
import os, sys
from minipar import checkpoint
stage, seen = sys.argv[1], []
def reached(name):
    if name == stage:
        seen.append(name)
        if len(seen) == 2:               # the second save: one complete checkpoint is on disk
            os._exit(9)
checkpoint._reached = reached
from minipar.train import main
sys.exit(main(sys.argv[2:]))
"""
STAGES = {"begin": 2, "rank file written": 2, "manifest written": 2, "committed": 4, "cleaned": 4}


def single():
    return Group.single(ledger=CommLedger())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    report = tmp_path_factory.mktemp("full") / "r.json"
    assert main(TINY + ["--steps", "6", "--report", str(report)], world=single()) == 0
    return json.loads(report.read_text())["losses"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_save_killed_at_any_stage_leaves_a_checkpoint(stage, tmp_path, uninterrupted):
    ck, script = tmp_path / "ck", tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), stage, *TINY, "--steps", "4", "--save-every", "2",
                           "--save", str(ck)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 9, proc.stderr                     # killed inside the second save
    manifest = read_manifest(str(ck))                 # complete and verified
    assert manifest["step"] == STAGES[stage]
    left = set(os.listdir(ck)) - {"manifest.json", *manifest["files"]}     # what the kill left behind
    assert bool(left) == (stage in ("rank file written", "manifest written", "committed")), left
    report = tmp_path / "r.json"
    assert main(TINY + ["--steps", "6", "--resume", str(ck), "--save", str(ck), "--report", str(report)],
                world=single()) == 0
    assert json.loads(report.read_text())["losses"] == uninterrupted[STAGES[stage]:]   # bit-identical
    manifest = read_manifest(str(ck))
    assert sorted(os.listdir(ck)) == sorted(["manifest.json", *manifest["files"]]), left   # cleaned
    assert manifest["step"] == 6
