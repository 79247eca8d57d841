"""The bad-input battery: every bad input is refused before any work, alike on every rank.

Each row of BAD is (id, flags, exit code): 2 for input refused before the first step
(flags, layout, paths, memory, data, checkpoint), 3 for a run that diverges. The whole
table runs through `minipar.train.main` in-process, at 1 rank (the serial part) and on a
block of 4 ranks (the MPI part): every rank must return the code, rank 0 alone prints
exactly one line on stderr and the others none, no traceback, each row under 30 s. In-process
keeps the ~90 rows to seconds; the exit path itself (exit status, no MPI banner, one line
through mpiexec) is checked on real processes for a representative subset at 1 and 4 ranks.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from minipar.manifest import read_manifest, sha256
from minipar.args import UsageError, build_parser
from minipar.comm.group import CommLedger, Group
from minipar.parity import agree
from minipar.train import configure, main

pytestmark = pytest.mark.core      # the training job's checkpoints and input checks: a core part

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "16", "--n-digits", "4", "--batch-size", "8",
        "--log-every", "1000", "--eval-samples", "16", "--steps", "3"]
NO_MATPLOTLIB = importlib.util.find_spec("matplotlib") is None

BAD = [
    # ---- each flag on its own: zero, negative, NaN, inf, not a number, not a choice
    *[(f"{flag}={value}", [flag, value], 2) for flag, value in [
        ("--steps", "0"), ("--steps", "-1"), ("--steps", "x"), ("--batch-size", "0"), ("--batch-size", "-8"),
        ("--batch-size", "1e8"), ("--dp", "0"), ("--dp", "-1"), ("--pp", "0"), ("--tp", "0"), ("--tp", "-8"),
        ("--micro-batches", "0"), ("--micro-batches", "-2"), ("--virtual-stages", "0"), ("--n-layer", "0"),
        ("--n-head", "0"), ("--d-model", "0"), ("--d-model", "-16"), ("--vocab", "0"), ("--vocab", "4"),
        ("--n-digits", "0"), ("--log-every", "0"), ("--eval-samples", "0"), ("--seed", "-1"),
        ("--save-every", "-1"), ("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"),
        ("--weight-decay", "nan"), ("--weight-decay", "-0.1"), ("--weight-decay", "inf"),
        ("--max-norm", "nan"), ("--max-norm", "-1"), ("--max-norm", "inf"), ("--bucket-mb", "0"),
        ("--bucket-mb", "-1"), ("--bucket-mb", "nan"), ("--dropout", "1"), ("--dropout", "-0.1"),
        ("--dropout", "nan"), ("--precision", "fp8"), ("--schedule", "pipedream"), ("--zero", "4"),
        ("--device", "tpu"), ("--optimizer", "lion"), ("--preset", "huge"), ("--collectives", "nccl"),
        ("--cp", "0"), ("--ep", "0"), ("--capacity-factor", "0"), ("--capacity-factor", "nan"),
        ("--capacity-factor", "inf")]],
    ("unknown-flag", ["--bogus"], 2),
    ("seq-len-0", ["--data", "{text}", "--seq-len", "0"], 2),
    # ---- rules between flags
    ("seq-len-without-data", ["--seq-len", "8"], 2),
    ("save-every-without-save", ["--save-every", "2"], 2),
    ("virtual-stages-without-interleaved", ["--virtual-stages", "2"], 2),
    ("trace-without-pipeline", ["--trace", "{tmp}/t.png"], 2),
    ("trace-not-png", ["--pp", "2", "--dp", "2", "--tp", "1", "--trace", "{tmp}/t.svg"], 2),
    *([("trace-png-without-matplotlib", ["--pp", "2", "--dp", "2", "--tp", "1", "--trace", "{tmp}/t.png"], 2)]
      if NO_MATPLOTLIB else []),
    # ---- layouts
    ("dp-not-world", ["--dp", "3"], 2),
    ("3d-not-world", ["--dp", "2", "--pp", "2", "--tp", "2"], 2),
    ("heads-not-dividing-width", ["--n-head", "3"], 2),
    ("heads-not-divisible-by-tp", ["--tp", "4", "--dp", "1", "--n-head", "2"], 2),
    ("zero3-with-tp", ["--zero", "3", "--tp", "2"], 2),
    ("batch-not-splitting", ["--batch-size", "6", "--micro-batches", "4"], 2),
    ("interleaved-micro-batches", ["--pp", "2", "--schedule", "interleaved", "--micro-batches", "3"], 2),
    ("layers-short-of-stages", ["--pp", "4", "--dp", "1", "--tp", "1"], 2),
    # ---- memory: the plan's estimate against this machine
    ("batch-too-big", ["--batch-size", "100000000"], 2),
    ("model-too-big", ["--n-layer", "4000", "--d-model", "4096", "--n-head", "32"], 2),
    ("eval-too-big", ["--eval-samples", "1000000000"], 2),
    # ---- data files
    ("data-missing", ["--data", "{tmp}/no-such-file.txt"], 2),
    ("data-directory", ["--data", "{tmp}"], 2),
    ("data-dev-null", ["--data", "/dev/null"], 2),
    ("data-empty", ["--data", "{empty}"], 2),
    ("data-too-short", ["--data", "{short}"], 2),
    # ---- output paths
    ("save-onto-file", ["--save", "{text}"], 2),
    ("save-into-foreign-dir", ["--save", "{foreign}"], 2),
    ("save-unwritable", ["--save", "/proc/minipar-ck"], 2),
    ("save-parent-missing", ["--save", "{tmp}/no/such/ck"], 2),
    ("report-directory", ["--report", "{tmp}"], 2),
    ("report-parent-missing", ["--report", "{tmp}/no/such/r.json"], 2),
    ("report-unwritable", ["--report", "/proc/minipar-r.json"], 2),
    # ---- --resume
    ("resume-missing", ["--resume", "{tmp}/no-such-ckpt"], 2),
    ("resume-not-a-checkpoint", ["--resume", "{foreign}"], 2),
    ("resume-at-saved-step", ["--resume", "{ck}", "--steps", "2"], 2),
    ("resume-below-saved-step", ["--resume", "{ck}", "--steps", "1"], 2),
    ("resume-other-width", ["--resume", "{ck}", "--d-model", "32"], 2),
    ("resume-other-depth", ["--resume", "{ck}", "--n-layer", "3"], 2),
    ("resume-untied", ["--resume", "{ck}", "--untied"], 2),
    ("resume-other-seed", ["--resume", "{ck}", "--seed", "1"], 2),
    ("resume-manifest-not-json", ["--resume", "{ck_notjson}"], 2),
    ("resume-manifest-other-format", ["--resume", "{ck_format}"], 2),
    ("resume-manifest-key-missing", ["--resume", "{ck_nokey}"], 2),
    ("resume-manifest-wrong-shape", ["--resume", "{ck_shape}"], 2),
    ("resume-manifest-renamed-key", ["--resume", "{ck_renamed}"], 2),
    ("resume-shard-wrong-shape-valid-checksum", ["--resume", "{ck_shard}"], 2),
    ("resume-nan-valid-checksum", ["--resume", "{ck_nan}"], 2),
    ("resume-truncated-file", ["--resume", "{ck_truncated}"], 2),
    ("resume-file-missing", ["--resume", "{ck_nofile}"], 2),
    # ---- runs that diverge: exit 3 naming the step
    ("diverges-fp64", ["--lr", "1e300", "--max-norm", "0"], 3),
    ("diverges-fp32", ["--lr", "1e30", "--max-norm", "0", "--precision", "fp32"], 3),
    ("diverges-mixed-skips", ["--lr", "1e30", "--max-norm", "0", "--precision", "mixed", "--steps", "60"], 3),
]
IDS = [row[0] for row in BAD]


def make_inputs(tmp):
    """Every file the table names, under `tmp`: {placeholder: path}."""
    paths = {"tmp": tmp}
    for name, text in (("text", "hello world, " * 20), ("empty", ""), ("short", "ab")):
        paths[name] = os.path.join(tmp, f"{name}.txt")
        with open(paths[name], "w") as f:
            f.write(text)
    paths["foreign"] = os.path.join(tmp, "foreign")
    os.makedirs(paths["foreign"])
    open(os.path.join(paths["foreign"], "notes.txt"), "w").close()
    ck = paths["ck"] = os.path.join(tmp, "ck")
    assert main(TINY + ["--steps", "2", "--save", ck], world=Group.single(ledger=CommLedger())) == 0
    manifest = read_manifest(ck)
    rank0 = next(iter(manifest["files"]))

    def variant(name, edit_manifest=None, edit_arrays=None):
        path = paths[f"ck_{name}"] = os.path.join(tmp, f"ck_{name}")
        shutil.copytree(ck, path)
        m = json.loads(open(os.path.join(path, "manifest.json")).read())
        if edit_arrays is not None:                   # rewrite the rank file, with a valid checksum
            with np.load(os.path.join(path, rank0)) as f:
                arrays = {k: f[k] for k in f.files}
            edit_arrays(arrays)
            with open(os.path.join(path, rank0), "wb") as f:
                np.savez(f, **arrays)
            m["files"][rank0] = sha256(os.path.join(path, rank0))
        if edit_manifest is not None:
            edit_manifest(m)
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump(m, f)
        return path

    def first_slice(m, key="param/wte.weight"):
        return next(e for e in m["slices"] if e["key"] == key)

    variant("format", lambda m: m.update(format="something-else"))
    variant("nokey", lambda m: m.pop("optimizer_t"))
    variant("shape", lambda m: first_slice(m).update(full_shape=[32, 16]))
    variant("renamed", lambda m: first_slice(m).update(name="wte.weights"))
    variant("shard", edit_arrays=lambda a: a.update({"param/wte.weight": a["param/wte.weight"][:3]}))
    variant("nan", edit_arrays=lambda a: a["m/ln_f.weight"].__setitem__(0, np.nan))
    path = variant("notjson")
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write("{not json")
    path = variant("truncated")
    data = open(os.path.join(path, rank0), "rb").read()
    open(os.path.join(path, rank0), "wb").write(data[: len(data) // 2])
    path = variant("nofile")
    os.remove(os.path.join(path, rank0))
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The battery's files, made once by world rank 0 and shared by every rank (the same paths)."""
    world = Group.world()
    tmp = str(tmp_path_factory.mktemp("battery")) if world.rank == 0 else None
    tmp = world.bcast_object(tmp) if world.size > 1 else tmp
    paths = make_inputs(tmp) if world.rank == 0 else None
    return world.bcast_object(paths) if world.size > 1 else paths


def run_row(row, inputs, capsys, group):
    """main() on `group` for one row: (its exit code, stderr lines, seconds)."""
    _, args, _ = row
    capsys.readouterr()
    start = time.perf_counter()
    code = main(TINY + [a.format(**inputs) for a in args], world=group)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    return code, err.splitlines(), seconds


# Each layout rule (minipar/layout.py) at a world size where it is the one that refuses: the
# message names the flags. At one rank most of these rows stop at the world size instead.
LAYOUT_RULES = [  # (id, world size, flags, words of the one line)
    ("tp-vocab", 4, ["--tp", "4", "--n-head", "4", "--vocab", "18"], "--tp 4 does not divide the vocabulary of 18"),
    ("tp-heads", 4, ["--tp", "4", "--n-head", "2"], "--tp 4 does not divide --n-head 2"),
    ("sp-seq-len", 4, ["--tp", "4", "--n-head", "4", "--sequence-parallel", "--n-digits", "3"],
     "--sequence-parallel cuts the sequence over --tp 4: seq_len=6"),
    ("sp-inside-cp", 8, ["--cp", "2", "--tp", "4", "--n-head", "4", "--sequence-parallel", "--n-digits", "6"],
     "--sequence-parallel with --cp 2 cuts each rank's seq_len/cp = 6 tokens over --tp 4"),
    ("cp-zigzag", 4, ["--cp", "4", "--n-digits", "6"], "--cp 4 cuts the sequence into 2*cp = 8 zigzag chunks"),
    ("world", 4, ["--dp", "2"], "--dp 2 x --pp 1 x --cp 1 x --tp 1 = 2 ranks does not match the 4 ranks"),
    ("fill-dp", 4, ["--tp", "3"], "--pp 1 x --tp 3 x --cp 1 = 3 does not divide the 4 ranks"),
    ("stages", 2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "3", "--n-layer", "4"],
     "--n-layer 4 cannot fill 6 pipeline stages (--pp 2 x --virtual-stages 3)"),
    ("interleaved-rounds", 2, ["--pp", "2", "--schedule", "interleaved", "--micro-batches", "3"],
     "--micro-batches (3) to be a multiple of --pp 2"),
    ("virtual-stages", 2, ["--pp", "2", "--virtual-stages", "2"], "--virtual-stages 2 needs --schedule interleaved"),
    ("message-tags", 4, ["--pp", "2", "--dp", "2", "--micro-batches", "8001", "--batch-size", "16002"],
     "--micro-batches 8001 x 2 pipeline stages need more message tags"),
    ("zero3-pp", 4, ["--zero", "3", "--pp", "2", "--dp", "2"], "--zero 3 with --tp 1 --pp 2"),
    ("zero3-experts", 2, ["--zero", "3", "--dp", "2", "--experts", "4"], "--zero 3 with --experts 4"),
    ("ep-dp", 4, ["--experts", "4", "--ep", "4", "--dp", "2", "--tp", "2"], "--ep 4 does not divide --dp 2"),
    ("experts-cp", 4, ["--experts", "4", "--cp", "2", "--dp", "2"], "--experts with --cp 2"),
    ("batch", 4, ["--dp", "4", "--batch-size", "6"], "--batch-size 6 does not split into --dp 4 x --micro-batches 1"),
]


@pytest.mark.parametrize("rule", LAYOUT_RULES, ids=[r[0] for r in LAYOUT_RULES])
def test_each_layout_rule_refuses_naming_its_flags(rule):
    _, world_size, flags, words = rule
    with pytest.raises(UsageError) as info:
        configure(build_parser().parse_args(TINY + flags), world_size)
    assert words in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("row", BAD, ids=IDS)
def test_refused_with_one_line_at_one_rank(row, inputs, capsys):
    code, lines, seconds = run_row(row, inputs, capsys, Group.single(ledger=CommLedger()))
    assert code == row[2], lines
    assert len(lines) == 1 and lines[0].startswith("minipar.train: error: "), lines
    assert seconds < 30


@pytest.mark.mpi
@pytest.mark.parametrize("row", BAD, ids=IDS)
def test_refused_alike_on_every_rank_of_four(row, inputs, capsys, group_of, device):
    if device != "cpu":
        pytest.skip("main() picks its device from --device; the CPU pass covers the battery")
    group = group_of(4)
    code, lines, seconds = run_row(row, inputs, capsys, group)
    codes = group.allgather_object(code)
    agree(group, codes == [row[2]] * 4, f"{row[0]}: exit codes by rank {codes}, expected {row[2]}")
    want = 1 if group.rank == 0 else 0
    ok = len(lines) == want and all(line.startswith("minipar.train: error: ") for line in lines)
    agree(group, ok, f"{row[0]}: rank {group.rank} printed {lines}")
    agree(group, seconds < 30, f"{row[0]}: took {seconds:.1f} s")


# ----------------------------------------------------------------------------- real processes
# The exit path: the process's status, one line on stderr, nothing from mpiexec.
SUBSET = ["--tp=0", "batch-too-big", "data-dev-null", "resume-at-saved-step", "resume-nan-valid-checksum",
          "diverges-fp64"]


@pytest.mark.parametrize("n", [1, 4])
def test_the_exit_path_is_one_line_and_the_code(n, inputs):
    env = dict(os.environ, PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    for row in (r for r in BAD if r[0] in SUBSET):
        args = TINY + [a.format(**inputs) for a in row[1]]
        cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "minipar.train", *args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert proc.returncode == row[2], (row[0], proc.stdout[-2000:], proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("minipar.train: error: "), (row[0], proc.stderr)
        assert "Traceback" not in proc.stderr and "BAD TERMINATION" not in proc.stdout, row[0]
        assert time.perf_counter() - start < 30, row[0]
