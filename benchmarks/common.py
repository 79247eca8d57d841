# (library for the benchmarks: run `python benchmarks/run.py`, or one bench: see its first line)
"""What the benchmarks share: the bench GPT, its FLOP count, a step timer, the out/ folder.

Model FLOPs per training step (the PaLM convention, Chowdhery et al. 2022,
appendix B; nanoGPT's `estimate_mfu` uses the same):

    per token   6 N  +  12 L T C        N: parameters, L: layers, T: sequence length, C: d_model
    per step    (6 N + 12 L T C) * B * T

6N: each weight does one multiply-add (2 FLOPs) per token forward and two in
backward (dX and dW). N counts every parameter except the position table wpe,
which is a lookup, not a matmul; the tied token embedding wte counts once, for
the lm_head matmul (its lookup is free). 12 L T C: the attention scores Q K^T
and the weighted sum A V, 2 T C multiply-adds each per token and layer, times 3
for forward + backward (causal masking is not subtracted, as in PaLM).
Recomputation, layer norms, softmax and the optimizer are not model FLOPs: MFU
counts only the work the model needs, however the step does it.
"""
import json
import os
import pathlib
import statistics
import time

from minipar.allocator import keep_freed_memory

BENCH_GPT = dict(vocab_size=256, seq_len=128, n_layer=4, n_head=8, d_model=512, precision="fp32")
BATCH = 8                                   # global batch (samples of seq_len tokens)
OUT = pathlib.Path(__file__).resolve().parent / "out"


def setup_process():
    """Run this benchmark process as `python -m minipar.train` runs its own: BLAS on one thread
    unless the caller chose (call before numpy is imported), and the step's freed memory kept
    for the next step (minipar/allocator.py: mallopt; imports no numpy)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    keep_freed_memory()


def bench_task():
    """The built-in reversal task with 64 digits: sequences of exactly seq_len = 128 tokens."""
    from minipar.data import ReverseTask
    return ReverseTask(n_digits=BENCH_GPT["seq_len"] // 2)


def model_flops_per_step(model, batch):
    """(6 N + 12 L T C) * tokens, with N = parameters except wpe (see the module docstring)."""
    cfg = model.cfg
    n = model.num_params() - model.wpe.weight.data.size
    tokens = batch * cfg.seq_len
    return (6 * n + 12 * cfg.n_layer * cfg.seq_len * cfg.d_model) * tokens


def time_steps(engine, task, batch, warmup, steps, first_step=0, world=None, cpu_times=None):
    """Seconds of each of `steps` train_steps, after `warmup` untimed ones. Each timed step
    ends when the device is done too (a GPU queues kernels asynchronously); with `world`,
    it is the slowest rank's time (max of one float over world, 0 bytes). `cpu_times`, a
    list, receives each timed step's CPU seconds of this process (time.process_time): on a
    shared machine the steadier figure, since waiting for a core is not counted."""
    from minipar.backend import synchronize        # here: importing numpy waits for setup_process()
    for step in range(first_step, first_step + warmup):
        engine.train_step(step, task, batch)
    times = []
    for step in range(first_step + warmup, first_step + warmup + steps):
        start, cpu = time.perf_counter(), time.process_time()
        engine.train_step(step, task, batch)
        synchronize(engine.params[0].data)                 # no-op for NumPy
        seconds = time.perf_counter() - start
        times.append(world.max_(seconds) if world is not None else seconds)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu)
    return times


def time_in_turns(engines, task, batch, warmup, steps, world, group):
    """Step every engine in turn, step by step, so load noise hits them alike.

    A step ends when the slowest rank is done (max of one float over `world`, 0 bytes).
    Returns {name: [seconds of each timed step]}, {name: bytes sent over `group` in the
    last timed step} and {name: timed steps the optimizer skipped (loss-scale overflow)}."""
    times = {name: [] for name in engines}
    sent, skipped = dict.fromkeys(engines, 0), dict.fromkeys(engines, 0)
    for step in range(warmup + steps):
        for name, engine in engines.items():
            before = engine.optimizer_step_count()
            with group.ledger.measure() as calls:
                start = time.perf_counter()
                engine.train_step(step, task, batch)
            seconds = world.max_(time.perf_counter() - start)
            if step >= warmup:
                times[name].append(seconds)
                sent[name] = calls.total_bytes(group=group.name)
                skipped[name] += engine.optimizer_step_count() == before
    return times, sent, skipped


def summarize(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def machine_load():
    """A warning when other processes share the cores (the 1-minute load average), else ''."""
    load, cores = os.getloadavg()[0], os.cpu_count()
    if load <= cores:
        return ""
    return f"warning: load average {load:.1f} on {cores} cores: timings are pessimistic"


def write_json(name, data):
    """benchmarks/out/<name>.json (the folder is git-ignored)."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
