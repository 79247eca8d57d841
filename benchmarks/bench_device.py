# mpiexec -n 1 python -m mpi4py benchmarks/bench_device.py --device gpu   (`make bench-gpu` runs -n 1, then -n 4)
"""The array swap: step time of the bench GPT with CuPy on the GPU against NumPy on the CPU.

1. serial, NumPy (1 BLAS thread)   rank 0 alone; only when the job has one rank
2. serial, --device                rank 0 alone: the same step with CuPy arrays
3. data parallel, --device         all n ranks share the one GPU, the same global batch
                                   split n ways; MPI messages are staged through host
                                   memory unless MPI is CUDA-aware (the PyPI MPICH is not),
                                   so the bytes copied each way per step are reported too

A GPU runs kernels asynchronously: each timed step ends with a device synchronize,
so the time is the work done, not the work queued. `--device strict` runs the
script on the CPU stand-in (timings then say nothing about a GPU; it checks the
script). Writes benchmarks/out/device_n<ranks>.json.
"""
import argparse
import sys

from common import (BATCH, BENCH_GPT, bench_task, model_flops_per_step, setup_process, summarize,
                    time_steps, write_json)

setup_process()  # before numpy is imported

from minipar.comm.group import CommLedger, Group  # noqa: E402
from minipar.comm.grid import ProcessGrid  # noqa: E402
from minipar.engine import Engine, Layout  # noqa: E402
from minipar.nn import GPT, GPTConfig  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="gpu", choices=["gpu", "strict"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (CuPy compiles kernels)")
    args = parser.parse_args(argv)
    world = Group.world(ledger=CommLedger())
    say = print if world.rank == 0 else (lambda *a, **k: None)
    cfg, task, n = GPTConfig(**BENCH_GPT), bench_task(), world.size
    if BATCH % n:
        sys.exit(f"bench_device: the batch of {BATCH} does not split over {n} ranks")
    result = {"device": args.device, "ranks": n, "config": BENCH_GPT, "batch": BATCH,
              "mpi_direct": world.wire.direct}

    serial = {}
    if world.rank == 0:                                    # the others wait at the barrier
        devices = ("cpu", args.device) if n == 1 else (args.device,)
        for device in devices:
            engine = Engine(cfg, Layout(), device=device)
            serial[device] = summarize(time_steps(engine, task, BATCH, args.warmup, args.steps))
    world.barrier()
    serial = world.bcast_object(serial)
    result["serial"] = serial

    moved = world.ledger.transfers
    if n > 1:
        engine = Engine(cfg, Layout(dp=n), device=args.device, grid=ProcessGrid(world, n, 1, 1))
        time_steps(engine, task, BATCH, args.warmup, 0, world=world)
        moved.reset()                                      # count the timed steps only
        dp = summarize(time_steps(engine, task, BATCH, 0, args.steps, args.warmup, world))
        result["dp"] = {**dp, "staged_to_host_per_step": moved.to_host / args.steps,
                        "staged_to_device_per_step": moved.to_device / args.steps}

    flops = model_flops_per_step(GPT(cfg), BATCH)
    say(f"bench GPT {cfg.n_layer}x{cfg.d_model}, batch {BATCH}, {cfg.precision}, {flops / 1e9:.1f} GFLOP "
        f"per step; device {args.device}; MPI {'CUDA-aware' if world.wire.direct else 'not CUDA-aware: staged'}")
    base = serial[args.device]["median_s"]
    if "cpu" in serial:
        cpu = serial["cpu"]["median_s"]
        say(f"{'serial, NumPy on the CPU (1 thread)':<40} {cpu:8.4f} s  {flops / cpu / 1e9:8.1f} GFLOP/s")
    say(f"{'serial, ' + args.device:<40} {base:8.4f} s  {flops / base / 1e9:8.1f} GFLOP/s"
        + (f"  ({cpu / base:.1f}x the CPU)" if "cpu" in serial else ""))
    if n > 1:
        say(f"{f'dp={n}, ranks sharing the device':<40} {dp['median_s']:8.4f} s  "
            f"({base / dp['median_s']:.2f}x the serial device step)")
        say(f"{'  staged through host memory per step':<40} {moved.to_host / args.steps / 2**20:8.2f} MiB down, "
            f"{moved.to_device / args.steps / 2**20:.2f} MiB up (rank 0)")
    if world.rank == 0:
        say(f"wrote {write_json(f'device_n{n}', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
