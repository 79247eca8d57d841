# python benchmarks/run.py            (`make bench`)
"""Run every benchmark, each in its own process, and print one summary table.

    bench_step.py              1 rank: matmul peak, step time of the bench GPT, MFU, profile
    bench_dp.py under -n 1     data-parallel strong scaling: the 1-rank baseline
    bench_dp.py under -n 2     ... the same global batch on 2 ranks, two ways to synchronise

Every process gets one BLAS thread (ranks must not fight over the cores). Each
writes benchmarks/out/<name>.json; this script adds out/summary.json. A full
run takes about a minute on 2 cores, well under 5.
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

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
    args = parser.parse_args(argv)
    mpiexec = find_mpiexec()
    if mpiexec is None:
        sys.exit("mpiexec not found: `make install` builds .venv with MPICH")

    steps = ["--steps", str(args.steps)]
    load_before = machine_load()
    wall = run([sys.executable, str(HERE / "bench_step.py"), *steps], timeout=150)
    for n in (1, args.ranks):
        wall += run([mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", str(HERE / "bench_dp.py"), *steps],
                    timeout=150)

    step, one, many = load("step"), load("dp_n1"), load(f"dp_n{args.ranks}")
    base = one["modes"]["no sync (1 rank)"]["median_s"]
    rows = [("matmul peak, 1 thread (GFLOP/s)", f"{step['peak_gflops']:.1f}", ""),
            ("step time, bench GPT (s)", f"{step['step']['median_s']:.3f}", ""),
            ("model FLOP/s (GFLOP/s)", f"{step['model_gflops']:.1f}", ""),
            ("MFU", f"{100 * step['mfu']:.1f} %", f">= {100 * TARGETS['mfu']:.0f} %"),
            ("DP 1 rank, step (s)", f"{base:.3f}", "")]
    speedups = {}
    for mode, r in many["modes"].items():
        speedups[mode] = base / r["median_s"]
        rows.append((f"DP {args.ranks} ranks, {mode}: step (s)", f"{r['median_s']:.3f}", ""))
        rows.append(("  speed-up vs 1 rank", f"{speedups[mode]:.2f} x",
                     f">= {TARGETS['dp_speedup_2']} x" if args.ranks == 2 else ""))
    print(f"\n{'summary':<44} {'measured':>10} {'target':>10}")
    for name, value, target in rows:
        print(f"{name:<44} {value:>10} {target:>10}")
    print(f"(all benchmarks: {wall:.0f} s)")
    for warning in dict.fromkeys(filter(None, [load_before, machine_load()])):
        print(warning)
    path = write_json("summary", {"mfu": step["mfu"], "peak_gflops": step["peak_gflops"],
                                  "step_s": step["step"]["median_s"], "dp_ranks": args.ranks,
                                  "dp_base_s": base, "dp_speedup": speedups, "targets": TARGETS,
                                  "wall_s": wall, "load_average": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
