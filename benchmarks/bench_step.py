# python benchmarks/bench_step.py
"""One rank, one BLAS thread: how close does a minipar training step get to the machine's peak?

1. Peak: the best float32 matmul (sgemm) rate this core reaches through NumPy,
   n^3 multiply-adds for n = 1024 and 2048, best of several runs, before and
   after the steps (other processes on a shared machine only ever slow a run
   down, so the best reading is the machine's). That is the ceiling any NumPy
   code here can hope for, so MFU is measured against it, not a datasheet.
2. Step: `Engine.train_step` of the bench GPT (common.BENCH_GPT, batch 8), the
   median of several steps after warm-up, in wall seconds and in CPU seconds
   (time.process_time: a step that waited for the core is not charged for it).
3. MFU = model FLOP/s / peak, model FLOPs by the PaLM convention (common.py),
   from wall seconds and from CPU seconds (the steadier figure on a shared machine).
4. Where the time goes: cProfile of one more step, by function, and the rate
   the Linear layers' matmuls alone reach. Below the target MFU, these lines
   say which ops to fix.
"""
import argparse
import cProfile
import pstats
import sys
import time
import types

from common import (BATCH, BENCH_GPT, bench_task, model_flops_per_step, setup_process, summarize,
                    time_steps, write_json)

setup_process()  # before numpy is imported

import numpy as np  # noqa: E402

from minipar import autograd, ops, optim  # noqa: E402
from minipar.engine import Engine, Layout  # noqa: E402
from minipar.layers import Linear  # noqa: E402
from minipar.nn import GPTConfig  # noqa: E402

TARGET_MFU = 0.45


def matmul_peak(sizes=(1024, 2048), repeats=7, clock=time.perf_counter):
    """Best GFLOP/s of C = A @ B, float32, (n, n) @ (n, n): 2 n^3 FLOPs, timed by `clock`
    (time.process_time for a peak in CPU seconds, to set against CPU-second step times)."""
    best = 0.0
    rng = np.random.default_rng(0)
    for n in sizes:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        c = np.empty((n, n), np.float32)
        for _ in range(repeats):
            start = clock()
            np.matmul(a, b, out=c)
            best = max(best, 2 * n ** 3 / max(clock() - start, 1e-9) / 1e9)
    return best


# ----------------------------------------------------------------------------- profile
def qualified_names(*modules):
    """{(file, first line): 'Class.method'} for every function in `modules`, nested ones too,
    so a profile says `Linear.backward.<locals>.weight_grads`, not just `weight_grads`."""
    names = {}

    def walk(code):
        names[code.co_filename, code.co_firstlineno] = getattr(code, "co_qualname", code.co_name)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                walk(const)
    for module in modules:
        for obj in vars(module).values():
            members = list(vars(obj).values()) if isinstance(obj, type) else [obj]
            for f in members:
                f = getattr(f, "__func__", f)               # staticmethod -> function
                if isinstance(f, types.FunctionType):
                    walk(f.__code__)
    return names


def profile_step(engine, task, step, top=12):
    """cProfile one train_step: [(function, calls, own seconds)] by own time, and the total."""
    profiler = cProfile.Profile()
    profiler.enable()
    engine.train_step(step, task, BATCH)
    profiler.disable()
    stats = pstats.Stats(profiler).stats                   # {(file, line, fn): (cc, nc, tt, ct, callers)}
    names = qualified_names(ops, optim, autograd)
    rows = sorted(((names.get((f, line), fn), nc, tt) for (f, line, fn), (_, nc, tt, _, _) in stats.items()),
                  key=lambda row: -row[2])
    return rows[:top], sum(row[2] for row in rows)


def linear_matmul_flops(model, batch):
    """FLOPs of every Linear's three matmuls (y = xW, dX, dW) in one step, the tied head included."""
    weights = [m.weight.data.size for _, m in model.named_modules() if isinstance(m, Linear)]
    if model.lm_head is None:
        weights.append(model.wte.weight.data.size)          # the tied head: x @ wte^T
    return 6 * sum(weights) * batch * model.cfg.seq_len


# ----------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    cfg = GPTConfig(**BENCH_GPT)
    engine = Engine(cfg, Layout())
    task = bench_task()
    peak, peak_cpu = matmul_peak(), matmul_peak(clock=time.process_time)
    cpu_times = []
    step = summarize(time_steps(engine, task, BATCH, args.warmup, args.steps, cpu_times=cpu_times))
    cpu = summarize(cpu_times)
    peak = max(peak, matmul_peak())        # again after: on a shared machine, keep the clean reading
    peak_cpu = max(peak_cpu, matmul_peak(clock=time.process_time))
    flops = model_flops_per_step(engine.model, BATCH)
    achieved = flops / step["median_s"] / 1e9
    mfu = achieved / peak
    mfu_cpu = flops / cpu["median_s"] / 1e9 / peak_cpu
    top, profiled = profile_step(engine, task, args.warmup + args.steps)
    # the Linear layers' share of the profiled step, applied to the (unprofiled) median step time
    linear_share = sum(s for name, _, s in top if name.startswith("Linear.")) / profiled
    linear_rate = linear_matmul_flops(engine.model, BATCH) / (linear_share * step["median_s"]) / 1e9

    print(f"bench GPT: L={cfg.n_layer} C={cfg.d_model} H={cfg.n_head} T={cfg.seq_len} V={cfg.vocab_size} "
          f"{cfg.precision}, batch {BATCH}: N = {engine.model.num_params():,} parameters")
    print(f"{'measured matmul peak (sgemm, 1 thread)':<44} {peak:8.1f} GFLOP/s")
    print(f"{'step time (median of ' + str(args.steps) + ')':<44} {step['median_s']:8.3f} s  "
          f"(min {step['min_s']:.3f})")
    print(f"{'step CPU time (median of ' + str(args.steps) + ')':<44} {cpu['median_s']:8.3f} s  "
          f"(min {cpu['min_s']:.3f})")
    print(f"{'model FLOPs per step (6N + 12LTC) * BT':<44} {flops / 1e9:8.2f} GFLOP")
    print(f"{'model FLOP/s':<44} {achieved:8.1f} GFLOP/s")
    print(f"{'MFU = model FLOP/s / measured peak':<44} {100 * mfu:8.1f} %   (target {100 * TARGET_MFU:.0f} %)")
    print(f"{'MFU from CPU seconds (vs CPU-second peak)':<44} {100 * mfu_cpu:8.1f} %   "
          f"(peak {peak_cpu:.1f} GFLOP/s per CPU second)")
    print(f"\nprofile of one step ({profiled:.3f} s under cProfile), by own time:")
    print(f"  {'function':<44} {'calls':>6} {'seconds':>8} {'share':>6}")
    for name, calls, seconds in top:
        print(f"  {name:<44} {calls:>6} {seconds:8.3f} {100 * seconds / profiled:5.1f}%")
    print(f"Linear layers: {100 * linear_share:.0f}% of the step, their matmuls run at {linear_rate:.1f} "
          f"GFLOP/s ({100 * linear_rate / peak:.0f}% of peak)")
    path = write_json("step", {
        "config": BENCH_GPT, "batch": BATCH, "n_params": engine.model.num_params(),
        "peak_gflops": peak, "peak_cpu_gflops": peak_cpu, "step": step, "step_cpu": cpu, "model_flops_per_step": flops,
        "model_gflops": achieved, "mfu": mfu, "mfu_cpu": mfu_cpu, "target_mfu": TARGET_MFU, "flops_convention": "PaLM: (6N + 12 L T C) per token, N w/o wpe",
        "profile": [{"function": n, "calls": c, "seconds": s} for n, c, s in top], "profiled_s": profiled,
        "linear_gflops": linear_rate, "linear_share": linear_share,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
