# mpiexec -n 2 python -m mpi4py benchmarks/bench_tp.py      (benchmarks/run.py runs it with -n 1 and -n 2)
"""Tensor parallelism on this machine: step time at tp = 1 and tp = N, and the share spent communicating.

All ranks of the job form one tensor-parallel group (ProcessGrid(world, 1, 1, N)),
so under `-n 1` this is the serial step and under `-n 2` each rank holds half of
every layer's heads and MLP columns (parallel/tensor/megatron.py). The bench GPT
(common.BENCH_GPT) trains on the global batch of 8 as in bench_dp.py, so
speed-up = step time at tp = 1 / step time at tp = N (run.py prints it).

Communication share = seconds spent inside the tp group's collectives during a
step / that step's time. The seconds come from a timing shim put on the tp
Group instance for this benchmark only (`CollectiveClock`): its all_reduce,
all_reduce_, reduce_scatter and all_gather are replaced by wrappers that add
their perf_counter time to a running sum. A collective returns only when every
rank has arrived, so this time includes *waiting* for a slower rank (load
imbalance, other processes on a shared machine), not just moving bytes: read it
as an upper bound on what the wire costs, and the smallest share over the steps
as the least disturbed reading.

Bytes per step come from the tp ledger and are compared with Megatron's count
for the layers (formulas.tp_comm_elements: per layer, two all-reduces of b*s*h
forward (g) and two backward (f), 8*b*s*h*(t-1)/t elements). The rest of the
traffic is outside the layers (megatron.py's docstring): the embedding's
g forward and the head's f backward (one all-reduce of b*s*h each) and the
vocab-parallel loss (all-reduces of b*s row maxima and 2*b*s sums).
"""
import argparse
import os
import statistics
import sys
import time

from common import BATCH, BENCH_GPT, bench_task, machine_load, setup_process, summarize, write_json

setup_process()  # before numpy is imported (minipar imports it)

from minipar.comm.group import CommLedger, Group  # noqa: E402
from minipar.comm.grid import ProcessGrid  # noqa: E402
from minipar.engine import Engine, Layout  # noqa: E402
from minipar.formulas import tp_comm_elements  # noqa: E402
from minipar.nn import GPTConfig  # noqa: E402


class CollectiveClock:
    """Seconds spent inside one Group's collectives, summed until `take()` reads and clears them.

    Installs itself on the Group *instance* (not the class): only this group's calls are timed,
    and the library code that calls `group.all_reduce(...)` is unchanged."""

    OPS = ("all_reduce", "all_reduce_", "reduce_scatter", "all_gather")

    def __init__(self, group):
        self.seconds = 0.0
        for op in self.OPS:
            setattr(group, op, self._timed(getattr(group, op)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed

    def take(self):
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def outside_layers_elements(b, s, h, t):
    """Elements each rank sends per step outside the transformer layers (no sequence parallelism):
    all-reduces of b*s*h (embedding g, head f) and of 3*b*s (loss: row max, sum exp, target logit)."""
    return 2 * (t - 1) / t * (2 * b * s * h + 3 * b * s)


def bench(world, grid, task, warmup, steps):
    """Step times (slowest rank), seconds in tp collectives (slowest rank) and tp bytes of the last step."""
    clock = CollectiveClock(grid.tp_group)
    engine = Engine(GPTConfig(**BENCH_GPT), Layout(tp=grid.tp), grid=grid)
    ledger = grid.tp_group.ledger
    times, comm, shares = [], [], []
    for step in range(warmup + steps):
        clock.take()
        with ledger.measure() as calls:
            start = time.perf_counter()
            engine.train_step(step, task, BATCH)
            seconds = time.perf_counter() - start
        in_comm = clock.take()
        # the step ends when the slowest rank is done: max over all ranks of three floats (0 bytes)
        step_s, comm_s, share = world.max_(seconds), world.max_(in_comm), world.max_(in_comm / seconds)
        if step >= warmup:
            times.append(step_s)
            comm.append(comm_s)
            shares.append(share)
            sent = calls.summary().get("tp", {})
    result = summarize(times)
    result.update(comm_median_s=statistics.median(comm), comm_share_median=statistics.median(shares),
                  comm_share_min=min(shares),
                  comm_s=comm, comm_share=shares, tp_by_op=sent,
                  tp_bytes_sent_per_step=sum(row["bytes"] for row in sent.values()))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    load_before = machine_load()
    world = Group.world(ledger=CommLedger())
    grid = ProcessGrid(world, 1, 1, world.size)
    r = bench(world, grid, bench_task(), args.warmup, args.steps)

    t, cfg = world.size, GPTConfig(**BENCH_GPT)
    b, s, h, itemsize = BATCH, cfg.seq_len, cfg.d_model, 4              # fp32 activations
    layers_bytes = tp_comm_elements(b, s, h, t, n_layers=cfg.n_layer) * itemsize
    outside_bytes = outside_layers_elements(b, s, h, t) * itemsize
    if world.rank == 0:
        print(f"tensor parallel, tp = {t}, global batch {BATCH}, bench GPT, one BLAS thread per rank")
        print(f"  step time (median of {args.steps}, slowest rank) {r['median_s']:8.3f} s   min {r['min_s']:.3f} s")
        print(f"  in tp collectives (slowest rank)            {r['comm_median_s']:8.3f} s   "
              f"share of step {100 * r['comm_share_median']:.1f} % (min {100 * r['comm_share_min']:.1f} %)")
        print(f"  tp bytes sent per rank per step (ledger)  {r['tp_bytes_sent_per_step'] / 1e6:10.3f} MB")
        print(f"    layers, 8*b*s*h*(t-1)/t * L * 4 B       {layers_bytes / 1e6:10.3f} MB   (formulas.tp_comm_elements)")
        print(f"    + outside, 2(t-1)/t*(2bsh + 3bs) * 4 B  {outside_bytes / 1e6:10.3f} MB   (embedding, head, loss)")
        print(f"    = {(layers_bytes + outside_bytes) / 1e6:.3f} MB, ledger - formula = "
              f"{r['tp_bytes_sent_per_step'] - layers_bytes - outside_bytes:.0f} B")
        for op, row in r["tp_by_op"].items():
            print(f"    {op:<15} {row['calls']:>4} calls {row['elements']:>12,} elements {row['bytes'] / 1e6:10.3f} MB")
        for warning in dict.fromkeys(filter(None, [load_before, machine_load()])):
            print(warning)
        path = write_json(f"tp_n{t}", {"tp": t, "batch": BATCH, "config": BENCH_GPT, **r,
                                       "formula_layers_bytes": layers_bytes,
                                       "formula_outside_bytes": outside_bytes,
                                       "load_average": list(os.getloadavg())})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
