# mpiexec -n 2 python -m mpi4py benchmarks/bench_zero.py      (benchmarks/run.py runs it with -n 2)
"""ZeRO stages 0 to 3 and ZeRO-Offload at dp = N: step time, bytes sent, model-state bytes.

Every rank is a data-parallel rank (ProcessGrid(world, N, 1, 1)); the bench GPT
(common.BENCH_GPT) trains on the global batch of 8 under five layouts:

    stage 0            plain DDP (parallel/data/ddp.py): all-reduce the gradients
    stage 1, 2, 3      Zero1-3 (parallel/zero/stage*.py): optimizer states, + gradients, + parameters sharded
    stage 2 + offload  stage 2 with the optimizer state and step on the host (zero/shard_optimizer.py)

and under two precisions: fp32, and mixed (fp16 parameters and gradients, fp32
master weights; slower here, since a CPU computes fp16 by casting).

For each layout the run reports, per rank and step:
  - the step time: the slowest rank's, median of a few steps after warm-up (the
    layouts take turns step by step, so load from other processes hits them alike);
  - bytes sent over the dp group, from its CommLedger, against the ring formula
    formulas.comm_elements_per_step: 2Φ(N-1)/N elements for stages 0-2, 3Φ(N-1)/N
    for stage 3, times the bytes of a gradient / parameter element;
  - model-state bytes (param + grad + master + Adam m, v + padding) from the
    engine's MemoryLedger, against formulas.model_state_bytes_formula (ZeRO paper
    §5): fp32 16Φ, 8Φ+8Φ/N, 4Φ+12Φ/N, 16Φ/N; mixed 16Φ, 4Φ+12Φ/N, 2Φ+14Φ/N, 16Φ/N.
    Φ is Φ_pad, the parameters with every flat unit padded to a multiple of N.
    Offload splits the bytes into device + host; under fp32 the host also keeps a
    master copy of its shard (4Φ/N more than the formula, see zero/shard_optimizer.py).

Mixed precision starts with loss scale 2^15; a step whose gradients overflow is
skipped (no optimizer step, so stages 1 and 2 skip their parameter all-gather
and send less). The `skipped` column counts those among the timed steps.
"""
import argparse
import os
import sys

from common import (BATCH, BENCH_GPT, bench_task, machine_load, setup_process, summarize,
                    time_in_turns, write_json)

setup_process()  # before numpy is imported (minipar imports it)

from minipar.comm.group import CommLedger, Group  # noqa: E402
from minipar.comm.grid import ProcessGrid  # noqa: E402
from minipar.engine import Engine, Layout  # noqa: E402
from minipar.formulas import bytes_per_param, comm_elements_per_step, model_state_bytes_formula  # noqa: E402
from minipar.nn import GPTConfig  # noqa: E402

LAYOUTS = {
    "stage 0 (DDP)": dict(zero=0),
    "stage 1": dict(zero=1),
    "stage 2": dict(zero=2),
    "stage 3": dict(zero=3),
    "stage 2 + offload": dict(zero=2, offload=True),
}


def padded_params(engine):
    """Φ_pad: a ZeRO stage pads each flat unit to a multiple of N; plain DDP has no padding."""
    return getattr(engine.optimizer, "numel_padded", engine.n_params)


def formulas(engine, precision, n):
    """(dp bytes sent per step, model-state bytes or (device, host)) predicted for this engine."""
    lay, phi = engine.layout, padded_params(engine)
    element = bytes_per_param(precision)["grad"]              # gradients and parameters travel alike
    sent = comm_elements_per_step(phi, n, lay.zero) * element
    return sent, model_state_bytes_formula(phi, n, lay.zero, precision, offload=lay.offload)


def bench_layouts(world, grid, precision, task, warmup, steps):
    """{layout: results} for one precision; the layouts take turns step by step."""
    cfg = GPTConfig(**dict(BENCH_GPT, precision=precision))
    engines = {name: Engine(cfg, Layout(dp=world.size, **kw), grid=grid) for name, kw in LAYOUTS.items()}
    times, sent, skipped = time_in_turns(engines, task, BATCH, warmup, steps, world, grid.dp_group)
    results = {}
    for name, engine in engines.items():
        sent_formula, state_formula = formulas(engine, precision, world.size)
        offload = engine.layout.offload
        state = ((engine.ledger.model_state_bytes("device"), engine.ledger.model_state_bytes("host"))
                 if offload else engine.ledger.model_state_bytes())
        results[name] = summarize(times[name])
        results[name].update(phi=engine.n_params, phi_padded=padded_params(engine),
                             dp_bytes_sent_per_step=sent[name], dp_bytes_formula=sent_formula,
                             model_state_bytes=state, model_state_formula=state_formula,
                             skipped_steps=skipped[name])
        if offload:
            results[name].update(bytes_to_host=engine.optimizer.optim.bytes_to_host,
                                 bytes_to_device=engine.optimizer.optim.bytes_to_device)
    return results


def megabytes(value):
    """'12.3' for a byte count, '12.3 + 45.6' for (device, host)."""
    if isinstance(value, tuple):
        return " + ".join(f"{v / 1e6:.1f}" for v in value)
    return f"{value / 1e6:.1f}"


def print_table(precision, n, results):
    print(f"\nZeRO at dp = {n}, precision {precision}, global batch {BATCH}, bench GPT "
          f"(Φ = {next(iter(results.values()))['phi']:,})")
    print(f"  {'layout':<18} {'step (median)':>13} {'min':>7} {'skipped':>7} | {'MB sent/rank':>12} "
          f"{'formula':>8} | {'model state MB/rank':>20} {'formula':>20}")
    for name, r in results.items():
        print(f"  {name:<18} {r['median_s']:11.3f} s {r['min_s']:7.3f} {r['skipped_steps']:>7} | "
              f"{r['dp_bytes_sent_per_step'] / 1e6:12.1f} {r['dp_bytes_formula'] / 1e6:8.1f} | "
              f"{megabytes(r['model_state_bytes']):>20} {megabytes(r['model_state_formula']):>20}")
    if any(isinstance(r["model_state_bytes"], tuple) for r in results.values()):
        print("  (offload: device + host)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", default="fp32,mixed", help="comma-separated: fp32, mixed, fp64")
    args = parser.parse_args(argv)

    load_before = machine_load()
    world = Group.world(ledger=CommLedger())
    grid = ProcessGrid(world, world.size, 1, 1)
    task = bench_task()
    results = {}
    for precision in args.precisions.split(","):
        results[precision] = bench_layouts(world, grid, precision, task, args.warmup, args.steps)
        if world.rank == 0:
            print_table(precision, world.size, results[precision])
    if world.rank == 0:
        for warning in dict.fromkeys(filter(None, [load_before, machine_load()])):
            print(warning)
        path = write_json(f"zero_n{world.size}", {"ranks": world.size, "batch": BATCH, "config": BENCH_GPT,
                                                  "precisions": results, "load_average": list(os.getloadavg())})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
