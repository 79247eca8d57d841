# mpirun -n 8 python -m mpi4py -m minipar.compare
"""Every strategy on the same model and global batch, measured side by side.

The "Comparison of Approaches" table, with the usual words (Low / Medium /
High) next to what this machine measured for one training step:

    model state   bytes of parameters, gradients, master weights and Adam states per rank
    activations   peak bytes saved for backward per rank
    sent          bytes this rank sends per step (ring-algorithm accounting, from the comm ledger)
    step          median wall time of a step (8 ranks share the cores here: compare, don't extrapolate)
    bubble        pipeline idle fraction (logical replay of what ran)
"""
import argparse
import sys
import time

import numpy as np

from minipar.data import ReverseTask
from minipar.dist.comm import CommLedger, Group
from minipar.dist.grid import ProcessGrid
from minipar.engine import Engine, Layout, OptimConfig
from minipar.nn import GPTConfig

#        name        layout for 8 ranks (scaled down for fewer)                   memory   comm     complexity
RUNS = [("DP",      dict(dp=8),                                                   "Low",   "Medium", "Low"),
        ("TP",      dict(tp=8),                                                   "High",  "High",   "High"),
        ("PP",      dict(pp=8, schedule="1f1b"),                                  "Medium", "Low",   "Medium"),
        ("3D",      dict(dp=2, pp=2, tp=2, schedule="1f1b", zero=1),              "High",  "Medium", "High"),
        ("ZeRO-1",  dict(dp=8, zero=1),                                           "Medium", "Medium", "Low"),
        ("ZeRO-2",  dict(dp=8, zero=2),                                           "Medium", "Medium", "Medium"),
        ("ZeRO-3",  dict(dp=8, zero=3),                                           "High",  "High",   "Medium"),
        ("Offload", dict(dp=8, zero=2, offload=True),                             "High",  "Medium", "Medium"),
        ("CP",      dict(dp=2, cp=4),                                             "Medium", "Medium", "High")]


def scaled(layout, world_size):
    """The 8-rank layout shrunk to `world_size` ranks (largest axis first)."""
    lay = dict(layout)
    while lay.get("dp", 1) * lay.get("pp", 1) * lay.get("tp", 1) * lay.get("cp", 1) > world_size:
        axis = max(("dp", "pp", "tp", "cp"), key=lambda a: lay.get(a, 1))
        lay[axis] = lay.get(axis, 1) // 2
    return lay


def measure(name, layout, cfg, world, steps, batch, task):
    ledger = CommLedger()
    group = world.using(ledger=ledger)
    lay = Layout(micro_batches=2 * layout.get("pp", 1), **layout)
    grid = ProcessGrid(group, lay.dp, lay.pp, lay.tp, lay.cp)
    engine = Engine(cfg, lay, OptimConfig(lr=1e-3), seed=0, grid=grid)
    times = []
    for step in range(steps):
        mark = ledger.snapshot()
        engine.ledger.reset_peak()
        t0 = time.perf_counter()
        engine.train_step(step, task, batch)
        times.append(time.perf_counter() - t0)
    sent = ledger.since(mark).total_bytes()          # the last step's traffic
    bubble = None
    if engine.pipeline is not None:
        from minipar.parallel.schedules import bubble_fraction, simulate
        executed = engine.pipeline.gather_executed()       # every stage's actions of the last step (pp group)
        bubble = float(bubble_fraction(simulate(executed, lay.pp, lay.virtual_stages), lay.pp))
    row = np.array([engine.ledger.model_state_bytes("device"), engine.ledger.model_state_bytes("host"),
                    engine.ledger.peak("activation"), sent, np.median(times[1:] or times)])
    # every rank's numbers; the table shows the max over ranks (the rank that limits the job)
    worst = world.all_reduce(row, op="max")
    return {"name": name, "layout": lay, "model_state": worst[0], "host": worst[1], "activation": worst[2],
            "sent": worst[3], "step_s": worst[4], "bubble": bubble}


def table(results, words):
    head = (f"{'approach':<8} {'layout':<14} {'model state':>12} {'host':>9} {'activ.':>9} {'sent/step':>10} "
            f"{'step':>8} {'bubble':>7}   {'memory':<7}{'comm':<8}{'complexity'}")
    lines = [head, "-" * len(head)]
    for r in results:
        lay = r["layout"]
        shape = f"d{lay.dp} p{lay.pp} t{lay.tp}" + (f" c{lay.cp}" if lay.cp > 1 else "") + (f" z{lay.zero}" if lay.zero else "")
        bubble = "-" if r["bubble"] is None else f"{r['bubble']:.3f}"
        mem, comm, cx = words[r["name"]]
        lines.append(f"{r['name']:<8} {shape:<14} {r['model_state'] / 2**20:10.3f}Mi {r['host'] / 2**20:7.3f}Mi "
                     f"{r['activation'] / 2**20:7.3f}Mi {r['sent'] / 2**20:8.3f}Mi {r['step_s'] * 1e3:6.0f}ms "
                     f"{bubble:>7}   {mem:<7}{comm:<8}{cx}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="minipar.compare", description=__doc__.split("\n")[1])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=("fp64", "fp32", "mixed"), default="mixed")
    p.add_argument("--report", help="write the table as JSON here")
    p.add_argument("--png", help="draw a bar chart of the measured columns (needs matplotlib)")
    args = p.parse_args(argv)
    world = Group.world()
    task = ReverseTask(8)
    cfg = GPTConfig(vocab_size=16, seq_len=task.seq_len, n_layer=8, n_head=8, d_model=64, precision=args.precision)
    words = {name: w for name, _, *w in RUNS}
    results = []
    for name, layout, *_ in RUNS:
        lay = scaled(layout, world.size)
        lay["dp"] = world.size // (lay.get("pp", 1) * lay.get("tp", 1) * lay.get("cp", 1))
        results.append(measure(name, lay, cfg, world, args.steps, args.batch_size, task))
    if world.rank == 0:
        print(f"GPT {cfg.n_layer}x{cfg.d_model}, {args.precision}, global batch {args.batch_size}, "
              f"{world.size} ranks; max over ranks of each column")
        print(table(results, words))
        if args.report:
            from minipar.report import write_json
            write_json({"rows": [{**r, "layout": vars(r["layout"])} for r in results]}, args.report)
        if args.png:
            save_png(results, args.png)
    return 0


def save_png(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = [("model_state", "model state (MiB)"), ("activation", "activations (MiB)"), ("sent", "sent/step (MiB)")]
    fig, axes = plt.subplots(1, len(cols), figsize=(12, 3.5))
    for ax, (key, title) in zip(axes, cols):
        ax.bar([r["name"] for r in results], [r[key] / 2**20 for r in results])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
