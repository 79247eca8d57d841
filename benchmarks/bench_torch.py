# python benchmarks/bench_torch.py --table
"""minipar against PyTorch eager on one core: CPU seconds per training step, taken in turns.

One shape per process: this process builds minipar's Engine for a GPT of that
shape and starts benchmarks/torch_gpt.py, the same model in PyTorch, in the
optional torch venv (.venv-torch, or --torch-python). Steps alternate,
minipar, torch, minipar, torch, ..., so load from other processes hits both
alike; each side times its own step in CPU seconds (time.process_time) and
wall seconds, one BLAS thread each. Reported: the medians, the ratio
minipar/torch of the CPU medians, and each process's peak RSS (ru_maxrss) and
RSS after the first and the last timed step (growth = a leak), the minor page
faults per step (memory the allocator gave back and takes again: the kernel
zeroes every faulted page), and the MFU of each (model FLOPs / CPU seconds /
the sgemm peak in CPU seconds, before and after).

`--table issue` runs the issue's four shapes (ISSUE_SHAPES), `--table` (or
`--table all`) those and a few more (wider, longer, larger batch, fp64), each in
its own process, and prints one table. Without torch installed it says so and
times minipar alone.
"""
import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from minipar.allocator import MMAP_BYTES, TRIM_BYTES
from common import BENCH_GPT, model_flops_per_step, setup_process, write_json

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TORCH_PYTHON = ROOT / ".venv-torch" / "bin" / "python"
TORCH_MISSING = (f"PyTorch not found at {TORCH_PYTHON}: timing minipar alone. For the comparison, "
                 f"`make torch-venv` (python3 -m venv .venv-torch && .venv-torch/bin/pip install torch numpy)")
# (d_model, seq_len, batch, precision): the issue's table first, then our own
TABLE = [(256, 128, 8, "fp32"), (512, 128, 8, "fp32"), (1024, 128, 8, "fp32"), (256, 512, 8, "fp32"),
         (512, 512, 8, "fp32"), (512, 128, 32, "fp32"), (256, 1024, 8, "fp32"), (512, 128, 8, "fp64")]
ISSUE_SHAPES = TABLE[:4]        # the issue's table: minipar's CPU seconds must not exceed torch's at each


def rss_mb():
    """Resident set size now (MB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def minor_faults():
    """Minor page faults of this process so far (getrusage)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def torch_worker(torch_python, setup):
    """Start torch_gpt.py with one thread and send it the model config. It runs under the same
    malloc setting as minipar (allocator.keep_freed_memory), given as glibc's variables."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_=str(MMAP_BYTES), MALLOC_TRIM_THRESHOLD_=str(TRIM_BYTES))
    proc = subprocess.Popen([str(torch_python), str(HERE / "torch_gpt.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    proc.stdin.write(json.dumps(setup) + "\n")
    return proc


def ask(proc, line):
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def one_shape(args):
    """Time minipar and torch in turns at one shape; returns the result dict."""
    setup_process()
    from bench_step import matmul_peak
    from minipar.data import ReverseTask
    from minipar.engine import Engine, Layout, OptimConfig
    from minipar.nn import GPTConfig

    gpt = dict(BENCH_GPT, d_model=args.d_model, seq_len=args.seq, precision=args.precision)
    if args.heads:
        gpt["n_head"] = args.heads
    optim = OptimConfig()
    engine = Engine(GPTConfig(**gpt), Layout(), optim)
    task = ReverseTask(n_digits=gpt["seq_len"] // 2)
    torch_python = pathlib.Path(args.torch_python)
    proc = None
    if torch_python.exists():
        proc = torch_worker(torch_python, {"gpt": gpt, "batch": args.batch, "lr": optim.lr,
                                           "betas": [optim.beta1, optim.beta2], "eps": optim.eps})
    else:
        print(TORCH_MISSING)
    peak = matmul_peak(clock=time.process_time)
    times = {"minipar": {"cpu": [], "wall": [], "minflt": []}, "torch": {"cpu": [], "wall": [], "minflt": []}}
    rss = []
    for step in range(args.warmup + args.steps):
        cpu, wall, faults = time.process_time(), time.perf_counter(), minor_faults()
        engine.train_step(step, task, args.batch)
        cpu, wall, faults = time.process_time() - cpu, time.perf_counter() - wall, minor_faults() - faults
        reply = ask(proc, f"step {step}") if proc else None
        if step >= args.warmup:
            times["minipar"]["cpu"].append(cpu)
            times["minipar"]["wall"].append(wall)
            times["minipar"]["minflt"].append(faults)
            rss.append(rss_mb())
            if reply:
                times["torch"]["cpu"].append(reply["cpu_s"])
                times["torch"]["wall"].append(reply["wall_s"])
                times["torch"]["minflt"].append(reply["minflt"])
    peak = max(peak, matmul_peak(clock=time.process_time))   # the clean reading of the same window
    flops = model_flops_per_step(engine.model, args.batch)
    result = {"gpt": gpt, "batch": args.batch, "steps": args.steps, "peak_gflops": peak,
              "minipar": {k: statistics.median(v) for k, v in times["minipar"].items()},
              "minipar_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "minipar_rss_first_last_mb": [rss[0], rss[-1]]}
    result["minipar_mfu_cpu"] = flops / result["minipar"]["cpu"] / 1e9 / peak
    if proc:
        result["torch"] = {k: statistics.median(v) for k, v in times["torch"].items()}
        result["torch_max_rss_mb"] = ask(proc, "rss")["max_rss_mb"]
        result["ratio_cpu"] = result["minipar"]["cpu"] / result["torch"]["cpu"]
        result["ratio_wall"] = result["minipar"]["wall"] / result["torch"]["wall"]
        result["torch_mfu_cpu"] = flops / result["torch"]["cpu"] / 1e9 / peak
        proc.stdin.close()
        proc.wait(timeout=60)
    return result


def describe(r):
    g = r["gpt"]
    shape = f"d {g['d_model']:>4} T {g['seq_len']:>4} B {r['batch']:>2} {g['precision']}"
    m = r["minipar"]
    line = (f"{shape}  minipar {m['cpu']:6.3f} cpu-s {m['wall']:6.3f} wall-s  MFU {100 * r['minipar_mfu_cpu']:4.1f}%"
            f"  rss {r['minipar_max_rss_mb']:5.0f} MB  faults {m['minflt']:6.0f}")
    if "torch" in r:
        t = r["torch"]
        line += (f" | torch {t['cpu']:6.3f} cpu-s {t['wall']:6.3f} wall-s  MFU {100 * r['torch_mfu_cpu']:4.1f}%"
                 f"  rss {r['torch_max_rss_mb']:5.0f} MB  faults {t['minflt']:6.0f}"
                 f" | minipar/torch cpu {r['ratio_cpu']:.2f} wall {r['ratio_wall']:.2f}")
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=BENCH_GPT["d_model"])
    parser.add_argument("--seq", type=int, default=BENCH_GPT["seq_len"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=0, help="0: the bench GPT's")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp64"))
    parser.add_argument("--steps", type=int, default=7, help="timed steps per side (medians reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--torch-python", default=str(TORCH_PYTHON))
    parser.add_argument("--table", nargs="?", const="all", choices=("issue", "all"),
                        help="issue: the four ISSUE_SHAPES; all (the default of a bare --table): every "
                             "shape of TABLE; one process each")
    parser.add_argument("--json", help="write the result dict to this file (used by --table)")
    args = parser.parse_args(argv)
    if not args.table:
        result = one_shape(args)
        print(describe(result), flush=True)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(result))
        return 0
    results = []
    for d, t, b, precision in ISSUE_SHAPES if args.table == "issue" else TABLE:
        out = HERE / "out" / f"torch_{d}_{t}_{b}_{precision}.json"
        out.parent.mkdir(exist_ok=True)
        subprocess.run([sys.executable, __file__, "--d-model", str(d), "--seq", str(t), "--batch", str(b),
                        "--precision", precision, "--steps", str(args.steps), "--warmup", str(args.warmup),
                        "--torch-python", args.torch_python, "--json", str(out)], check=True, cwd=ROOT)
        results.append(json.loads(out.read_text()))
    print("\nall shapes (CPU seconds per step, medians of steps taken in turns):")
    for r in results:
        print(describe(r))
    path = write_json("torch", {"shapes": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
