# mpiexec -n 2 python -m mpi4py benchmarks/bench_dp.py      (benchmarks/run.py runs it with -n 1 and -n 2)
"""Strong scaling of data parallelism: the same global batch on 1 or N ranks.

The bench GPT (common.BENCH_GPT) trains on a fixed global batch of 8, so on N
ranks each does 1/N of the compute and then all-reduces Phi gradients. Two ways
to synchronise are timed, and ZeRO-1 (with N = 1 there is nothing to synchronise):

    bucketed+overlap   DDP as in parallel/data/ddp.py: 1 MiB buckets, each all-reduce
                       launched (MPI Iallreduce) as soon as its gradients are final
    one bucket, after  a single all-reduce of every gradient once backward is done
    ZeRO-1             reduce-scatter after backward, AdamW on this rank's Phi/N, all-gather

Besides the step time (the slowest rank's, median of several steps; the modes
take turns step by step, so load from other processes hits them alike) the run
reports the time spent in `DataParallel.finish()`: communication backward did
not hide. Speed-up = step time on 1 rank / step time on N ranks (run.py).

What to expect on one machine: the all-reduce runs through shared memory and
costs a few per cent of the step, and MPICH has no progress thread by default,
so a launched Iallreduce advances only inside later MPI calls (the next launch,
the final wait). Overlap has little to hide here; what keeps the speed-up below
N is mostly the optimizer step, which every rank repeats on all Phi parameters
(ZeRO-1 shards it).
"""
import argparse
import statistics
import sys
import time

from common import BATCH, BENCH_GPT, bench_task, setup_process, summarize, time_in_turns, write_json

setup_process()  # before numpy is imported (minipar imports it)

from minipar.comm.group import CommLedger, Group  # noqa: E402
from minipar.comm.grid import ProcessGrid  # noqa: E402
from minipar.engine import Engine, Layout  # noqa: E402
from minipar.nn import GPTConfig  # noqa: E402
from minipar.parallel.data.ddp import DataParallel  # noqa: E402

SYNC_MODES = {
    "bucketed+overlap": dict(bucket_bytes=2 ** 20, overlap=True),
    "one bucket, after": dict(bucket_bytes=2 ** 40, overlap=False),
    "ZeRO-1": dict(zero=1),       # the optimizer step sharded: each rank updates Phi/N, then all-gathers
}


def timed_finish(engine):
    """Wrap engine.sync.finish so each call's seconds are appended to the returned list."""
    seconds, finish = [], engine.sync.finish

    def finish_and_time():
        start = time.perf_counter()
        finish()
        seconds.append(time.perf_counter() - start)
    engine.sync.finish = finish_and_time
    return seconds


def bench_modes(world, grid, modes, task, warmup, steps):
    """{mode: timings}. The modes take turns step by step, so a burst of load from other
    processes on a shared machine hits every mode alike instead of ruining one."""
    engines = {mode: Engine(GPTConfig(**BENCH_GPT), Layout(dp=world.size, **SYNC_MODES.get(mode, {})),
                            grid=grid) for mode in modes}
    finish_s = {mode: timed_finish(e) if isinstance(e.sync, DataParallel) else [] for mode, e in engines.items()}
    times, sent, _ = time_in_turns(engines, task, BATCH, warmup, steps, world, grid.dp_group)
    results = {}
    for mode, engine in engines.items():
        results[mode] = summarize(times[mode])
        results[mode].update(finish_median_s=statistics.median(finish_s[mode][warmup:] or [0.0]),
                             dp_bytes_sent_per_step=sent[mode],
                             buckets=len(engine.sync.buckets) if isinstance(engine.sync, DataParallel) else 0)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)

    world = Group.world(ledger=CommLedger())
    grid = ProcessGrid(world, world.size, 1, 1)
    task = bench_task()
    modes = list(SYNC_MODES) if world.size > 1 else ["no sync (1 rank)"]
    results = bench_modes(world, grid, modes, task, args.warmup, args.steps)
    if world.rank == 0:
        print(f"data parallel on {world.size} rank(s), global batch {BATCH}, bench GPT")
        print(f"  {'sync':<20} {'step (median)':>14} {'min':>8} {'in finish()':>12} {'buckets':>8} "
              f"{'MB sent/rank':>13}")
        for mode, r in results.items():
            print(f"  {mode:<20} {r['median_s']:12.3f} s {r['min_s']:8.3f} {r.get('finish_median_s', 0):10.3f} s "
                  f"{r.get('buckets', 0):>8} {r.get('dp_bytes_sent_per_step', 0) / 1e6:13.1f}")
        path = write_json(f"dp_n{world.size}", {"ranks": world.size, "batch": BATCH, "config": BENCH_GPT,
                                                "modes": results})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
