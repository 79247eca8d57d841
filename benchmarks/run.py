# python benchmarks/run.py            (`make bench`)
"""Run every benchmark, each in its own process, and print one summary table.

    bench_step.py              1 rank: matmul peak, step time of the bench GPT, MFU, profile
    bench_torch.py             the same step against PyTorch eager, in turns, CPU seconds, at the
                               issue's four shapes if .venv-torch exists (--torch-table: every
                               shape of bench_torch.TABLE); without torch it says so and times
                               minipar alone on the bench GPT
    bench_dp.py under -n 1     data-parallel strong scaling: the 1-rank baseline
    bench_dp.py under -n 2     ... the same global batch on 2 ranks, two ways to synchronise
    bench_tp.py under -n 1, 2  tensor parallelism: step time at tp = 1, 2; share of it in tp collectives
    bench_zero.py under -n 2   ZeRO stages 0-3 and offload at dp = 2: step time, bytes sent, model state

Every process gets one BLAS thread (ranks must not fight over the cores). Each
writes benchmarks/out/<name>.json; this script adds out/summary.json. A full
run takes about a minute and a half on an idle 2-core machine (four minutes more
with .venv-torch: the torch comparison at the issue's four shapes).
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from bench_torch import TORCH_MISSING, TORCH_PYTHON
from common import OUT, machine_load, write_json

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TARGETS = {"mfu": 0.45, "dp_speedup_2": 1.7}


def find_mpiexec():
    """The mpiexec next to this Python (the venv's MPICH), else the one on PATH."""
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def run(command, timeout):
    """Run one benchmark process with one BLAS thread and minipar importable; echo its output."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    print(f"\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=ROOT, timeout=timeout, check=True)
    return time.perf_counter() - start


def load(name):
    return json.loads((OUT / f"{name}.json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel ranks to scale to")
    parser.add_argument("--torch-table", action="store_true",
                        help="compare with PyTorch at every shape of bench_torch.TABLE, not only the issue's four")
    args = parser.parse_args(argv)
    mpiexec = find_mpiexec()
    if mpiexec is None:
        sys.exit("mpiexec not found: `make install` builds .venv with MPICH")

    steps = ["--steps", str(args.steps)]
    load_before = machine_load()
    wall = run([sys.executable, str(HERE / "bench_step.py"), *steps], timeout=150)
    have_torch = TORCH_PYTHON.exists()
    if not have_torch:
        print(f"\n{TORCH_MISSING}")
    torch_args = (["--table", "all" if args.torch_table else "issue"] if have_torch
                  else ["--json", str(OUT / "torch_bench.json")])
    wall += run([sys.executable, str(HERE / "bench_torch.py"), *torch_args, *steps],
                timeout=3000 if args.torch_table else 900 if have_torch else 300)
    for bench in ("bench_dp.py", "bench_tp.py"):
        for n in (1, args.ranks):
            wall += run([mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", str(HERE / bench), *steps],
                        timeout=150)
    wall += run([mpiexec, "-n", str(args.ranks), sys.executable, "-m", "mpi4py", str(HERE / "bench_zero.py"),
                 "--steps", str(min(args.steps, 3))], timeout=240)

    step, one, many = load("step"), load("dp_n1"), load(f"dp_n{args.ranks}")
    base = one["modes"]["no sync (1 rank)"]["median_s"]
    rows = [("matmul peak, 1 thread (GFLOP/s)", f"{step['peak_gflops']:.1f}", ""),
            ("step time, bench GPT (s)", f"{step['step']['median_s']:.3f}", ""),
            ("model FLOP/s (GFLOP/s)", f"{step['model_gflops']:.1f}", ""),
            ("step CPU time, bench GPT (s)", f"{step['step_cpu']['median_s']:.3f}", ""),
            ("MFU", f"{100 * step['mfu']:.1f} %", f">= {100 * TARGETS['mfu']:.0f} %"),
            ("MFU from CPU seconds", f"{100 * step['mfu_cpu']:.1f} %", "")]
    vs_torch = load("torch")["shapes"] if have_torch else [load("torch_bench")]
    for r in vs_torch:
        g = r["gpt"]
        rows.append((f"minipar/torch CPU-s, d {g['d_model']} T {g['seq_len']} B {r['batch']} {g['precision']}",
                     f"{r['ratio_cpu']:.2f}" if "ratio_cpu" in r else "no torch", "<= 1.0"))
    rows.append(("DP 1 rank, step (s)", f"{base:.3f}", ""))
    speedups = {}
    for mode, r in many["modes"].items():
        speedups[mode] = base / r["median_s"]
        rows.append((f"DP {args.ranks} ranks, {mode}: step (s)", f"{r['median_s']:.3f}", ""))
        rows.append(("  speed-up vs 1 rank", f"{speedups[mode]:.2f} x",
                     f">= {TARGETS['dp_speedup_2']} x" if args.ranks == 2 else ""))
    tp_one, tp_many = load("tp_n1"), load(f"tp_n{args.ranks}")
    rows += [("TP 1 rank, step (s)", f"{tp_one['median_s']:.3f}", ""),
             (f"TP {args.ranks} ranks, step (s)", f"{tp_many['median_s']:.3f}", ""),
             ("  speed-up vs 1 rank", f"{tp_one['median_s'] / tp_many['median_s']:.2f} x", ""),
             ("  share of step in tp collectives", f"{100 * tp_many['comm_share_median']:.1f} %", "")]
    zero = load(f"zero_n{args.ranks}")["precisions"]
    for precision, layouts in zero.items():
        for name, r in layouts.items():
            rows.append((f"ZeRO {precision}, {name}: step (s)", f"{r['median_s']:.3f}", ""))
    print(f"\n{'summary':<44} {'measured':>10} {'target':>10}")
    for name, value, target in rows:
        print(f"{name:<44} {value:>10} {target:>10}")
    print(f"(all benchmarks: {wall:.0f} s)")
    if not have_torch:
        print(TORCH_MISSING)
    for warning in dict.fromkeys(filter(None, [load_before, machine_load()])):
        print(warning)
    path = write_json("summary", {"mfu": step["mfu"], "peak_gflops": step["peak_gflops"],
                                  "step_s": step["step"]["median_s"], "step_cpu_s": step["step_cpu"]["median_s"],
                                  "vs_torch": [{k: r.get(k) for k in ("gpt", "batch", "ratio_cpu")} for r in vs_torch],
                                  "dp_ranks": args.ranks,
                                  "dp_base_s": base, "dp_speedup": speedups, "targets": TARGETS,
                                  "tp_step_s": {1: tp_one["median_s"], args.ranks: tp_many["median_s"]},
                                  "tp_comm_share": tp_many["comm_share_median"],
                                  "zero_step_s": {p: {name: r["median_s"] for name, r in layouts.items()}
                                                  for p, layouts in zero.items()},
                                  "wall_s": wall, "load_average": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
