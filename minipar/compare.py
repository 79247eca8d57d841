# mpirun -n 8 python -m mpi4py -m minipar.compare
"""Every strategy on the same model and global batch, measured side by side.

The seed's "Comparison of Approaches" table, four columns, each word set next to
the numbers that back it. The first three words are the seed's, true at scale; on this
tiny model a number may disagree with its word (PP's activations here are spread over 8
stages), and then the number is what this run measured:

  memory efficiency          how LITTLE memory a rank needs: High = least. Backed by
                             the bytes per rank measured by the memory ledger (model
                             state + peak activations on the device, max over ranks)
                             and their ratio to DP's ("x DP": below 1 is better).
  communication cost         how many bytes a rank sends per step: High = most. Backed
                             by the comm ledger's ring-algorithm bytes of the last step
                             (max over ranks) and their ratio to DP's.
  implementation complexity  how much code the strategy needs: High = most. Backed by
                             the lines of its own files (not blank, not comment-only);
                             ZeRO's stages share parallel/zero/.
  scalability                how the largest trainable model grows as devices are added.
                             Backed by minipar.plan's model-state formulas (formulas.py):
                             the largest Φ whose model states fit in 80 GB devices
                             (mixed precision, Adam) at 8, 64 and 512 devices, with TP
                             inside a node of 8 and at most 8 or 64 pipeline stages
                             (RUNS' `scale` caps; the rest of the devices go to dp).
                             The word follows the numbers: Low if Φ_max at 512 devices
                             is under 2x its value at 8, High if at least 32x (the
                             devices grew 64x), Medium between. Activations are left out.

ZeRO-3 is shown twice. With m micro-batches per step it gathers every layer's parameters
before each micro-batch's forward and again before its backward, and reduce-scatters each
micro-batch's gradients: 3mΦ(N-1)/N elements, 1.5m x DP, whose all-reduce runs once per
step whatever m is. So "ZeRO-3" (m = 2 micro-batches per rank, as in every dp row here)
costs 3.0x DP and "ZeRO-3 m=1" shows the paper's 1.5x. Other extra columns: host (Offload's optimizer
state), step (median wall time; 8 ranks share this machine's cores: compare, don't
extrapolate) and bubble (pipeline idle fraction, logical replay of what ran).
"""
import argparse
import importlib.util
import sys
import time

import numpy as np

from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.engine import Engine, Layout, OptimConfig
from minipar.formulas import model_state_bytes_formula
from minipar.nn import GPTConfig
from minipar.parallel.pipeline.schedules import bubble_fraction, simulate
from minipar.report import write_json

DEVICE_BYTES = 80e9                 # scalability: devices of 80 GB (1 GB = 1e9 bytes, as in minipar.plan)
DEVICE_COUNTS = (8, 64, 512)

# One row per approach; rows may be added (keep one line each). Columns:
#   name, layout on 8 ranks (scaled down for fewer; micro_batches defaults to 2*pp),
#   scale (caps of tp / pp when the devices grow; dp takes the rest), the seed's words for
#   memory efficiency / communication cost / implementation complexity, its modules (minipar.*)
DP_FILES = ("parallel.data.ddp",)
PP_FILES = ("parallel.pipeline.executor", "parallel.pipeline.schedules", "parallel.pipeline.stages")
TP_FILES = ("parallel.tensor.megatron", "parallel.tensor.sequence", "parallel.tensor.vocab")
ZERO_FILES = ("parallel.zero.stages", "parallel.zero.base", "parallel.zero.stage0", "parallel.zero.stage1",
              "parallel.zero.stage2", "parallel.zero.stage3", "parallel.zero.partition")
OFFLOAD_FILES = ZERO_FILES + ("parallel.zero.shard_optimizer",)
CP_FILES = ("parallel.context.model", "parallel.context.ring_attention", "parallel.context.ulysses",
            "parallel.context.split", "parallel.context.online_softmax")
THREE_D_FILES = DP_FILES + ("comm.grid",) + TP_FILES + PP_FILES + ZERO_FILES
RUNS = [
    ("DP",         dict(dp=8),                                      {},               "Low",    "Medium", "Low",    DP_FILES),
    ("TP",         dict(tp=8),                                      dict(tp=8),       "High",   "High",   "High",   TP_FILES),
    ("PP",         dict(pp=8, schedule="1f1b"),                     dict(pp=64),      "Medium", "Low",    "Medium", PP_FILES),
    ("3D",         dict(dp=2, pp=2, tp=2, schedule="1f1b", zero=1), dict(tp=8, pp=8), "High",   "Medium", "High",   THREE_D_FILES),
    ("ZeRO-1",     dict(dp=8, zero=1),                              {},               "Medium", "Medium", "Low",    ZERO_FILES),
    ("ZeRO-2",     dict(dp=8, zero=2),                              {},               "Medium", "Medium", "Medium", ZERO_FILES),
    ("ZeRO-3",     dict(dp=8, zero=3),                              {},               "High",   "High",   "Medium", ZERO_FILES),
    ("ZeRO-3 m=1", dict(dp=8, zero=3, micro_batches=1),             {},               "High",   "High",   "Medium", ZERO_FILES),
    ("Offload",    dict(dp=8, zero=2, offload=True),                {},               "High",   "Medium", "Medium", OFFLOAD_FILES),
    ("CP",         dict(dp=2, cp=4),                                {},               "Medium", "Medium", "High",   CP_FILES),
]


def scaled(layout, world_size):
    """The 8-rank layout shrunk to `world_size` ranks (largest axis first)."""
    lay = dict(layout)
    while lay.get("dp", 1) * lay.get("pp", 1) * lay.get("tp", 1) * lay.get("cp", 1) > world_size:
        axis = max(("dp", "pp", "tp", "cp"), key=lambda a: lay.get(a, 1))
        lay[axis] = lay.get(axis, 1) // 2
    return lay


def code_lines(modules):
    """Lines of the modules' files that are neither blank nor only a comment."""
    total = 0
    for name in modules:
        with open(importlib.util.find_spec(f"minipar.{name}").origin) as f:
            total += sum(1 for line in f if line.strip() and not line.lstrip().startswith("#"))
    return total


def largest_model(layout, scale, n_devices, device_bytes=DEVICE_BYTES, precision="mixed"):
    """Φ_max: the most parameters whose model states fit in `device_bytes` per device on
    n_devices, laid out as tp = min(cap, n), pp = min(cap, n/tp), dp = the rest, with the
    row's ZeRO stage over dp. Each model-parallel rank holds Φ/(tp·pp) (formulas.py's ZeRO
    formulas, linear in Φ: 16Φ, 4Φ+12Φ/N, 2Φ+14Φ/N, 16Φ/N; Offload keeps only the device part)."""
    tp = min(scale.get("tp", 1), n_devices)
    pp = min(scale.get("pp", 1), n_devices // tp)
    dp = n_devices // (tp * pp)
    per_param = model_state_bytes_formula(1.0, dp, layout.get("zero", 0), precision,
                                          offload=layout.get("offload", False))
    device_per_param = per_param[0] if layout.get("offload", False) else per_param   # (device, host)
    return device_bytes * tp * pp / device_per_param


def scalability_word(phis):
    """Low / Medium / High from how Φ_max grows from the fewest to the most devices."""
    growth = phis[-1] / phis[0]
    return "Low" if growth < 2 else "High" if growth >= 32 else "Medium"


def measure(name, layout, cfg, world, steps, batch, task):
    ledger = CommLedger()
    group = world.using(ledger=ledger)
    layout = dict(layout)
    lay = Layout(micro_batches=layout.pop("micro_batches", 2 * layout.get("pp", 1)), **layout)
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
        executed = engine.pipeline.gather_executed()       # every stage's actions of the last step (pp group)
        bubble = float(bubble_fraction(simulate(executed, lay.pp, lay.virtual_stages), lay.pp))
    row = np.array([engine.ledger.model_state_bytes("device"), engine.ledger.model_state_bytes("host"),
                    engine.ledger.peak("activation"), sent, np.median(times[1:] or times)])
    # all-reduce (max) over world of 5 float64 numbers: the table shows the rank that limits the job
    worst = world.all_reduce(row, op="max")
    return {"name": name, "layout": lay, "model_state": worst[0], "host": worst[1], "activation": worst[2],
            "sent": worst[3], "step_s": worst[4], "bubble": bubble}


def add_columns(results, runs=RUNS):
    """Each result gets the four columns' numbers and words (ratios to the DP row)."""
    by_name = {name: (lay, scale, words, files) for name, lay, scale, *words, files in runs}
    dp = next(r for r in results if r["name"] == "DP")
    dp_memory = dp["model_state"] + dp["activation"]
    for r in results:
        lay, scale, words, files = by_name[r["name"]]
        phis = [largest_model(lay, scale, n) for n in DEVICE_COUNTS]
        memory = r["model_state"] + r["activation"]
        r.update(memory=memory, memory_x_dp=memory / dp_memory,
                 sent_x_dp=r["sent"] / dp["sent"] if dp["sent"] else None, lines=code_lines(files),
                 largest_model={str(n): phi for n, phi in zip(DEVICE_COUNTS, phis)},
                 words={"memory efficiency": words[0], "communication cost": words[1],
                        "implementation complexity": words[2], "scalability": scalability_word(phis)})
    return results


def ratio(x):
    return "    -" if x is None else f"{x:5.2f}x"       # no DP traffic on one rank: no ratio


def table(results):
    counts = "/".join(str(n) for n in DEVICE_COUNTS)
    head1 = (f"{'':<11}{'':<12}| {'memory efficiency':<24}| {'communication cost':<24}| "
             f"{'implementation complexity':<26}| {'scalability':<36}| extras")
    head2 = (f"{'approach':<11}{'layout':<12}| {'MiB/rank':>9} {'x DP':>6} {'':<7}| {'sent/step':>9} {'x DP':>6} "
             f"{'':<7}| {'lines of code':>13} {'':<12}| {'largest Φ, ' + counts + ' x 80 GB':>27} {'':<8}"
             f"| {'host':>7} {'step':>7} {'bubble':>6}")
    lines = [head1, head2, "-" * len(head2)]
    for r in results:
        lay, w = r["layout"], r["words"]
        shape = f"d{lay.dp}p{lay.pp}t{lay.tp}" + (f"c{lay.cp}" if lay.cp > 1 else "") + (f"z{lay.zero}" if lay.zero else "") + \
            (f" m{lay.micro_batches}" if lay.micro_batches != 2 * lay.pp else "")
        phis = " / ".join(f"{phi / 1e9:6.1f}B" for phi in r["largest_model"].values())
        bubble = "-" if r["bubble"] is None else f"{r['bubble']:.3f}"
        lines.append(f"{r['name']:<11}{shape:<12}| {r['memory'] / 2**20:9.3f} {r['memory_x_dp']:5.2f}x "
                     f"{w['memory efficiency']:<7}| {r['sent'] / 2**20:9.3f} {ratio(r['sent_x_dp'])} "
                     f"{w['communication cost']:<7}| {r['lines']:>13} {w['implementation complexity']:<12}| "
                     f"{phis:>27} {w['scalability']:<8}| {r['host'] / 2**20:6.3f}M {r['step_s'] * 1e3:5.0f}ms "
                     f"{bubble:>6}")
    return "\n".join(lines)


def legend():
    """What each column's word means, and why ZeRO-3 is shown twice (the module docstring)."""
    return "\n\n".join(__doc__.split("\n\n")[2:4])


def main(argv=None):
    p = argparse.ArgumentParser(prog="minipar.compare", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3, help="training steps per approach (default: 3)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (default: 32)")
    p.add_argument("--precision", choices=("fp64", "fp32", "mixed"), default="mixed", help="(default: mixed)")
    p.add_argument("--report", help="write the table as JSON here")
    p.add_argument("--png", help="draw a bar chart of the measured columns (needs matplotlib)")
    args = p.parse_args(argv)
    world = Group.world()
    task = ReverseTask(8)
    cfg = GPTConfig(vocab_size=16, seq_len=task.seq_len, n_layer=8, n_head=8, d_model=64, precision=args.precision)
    results = []
    for name, layout, *_ in RUNS:
        lay = scaled(layout, world.size)
        lay["dp"] = world.size // (lay.get("pp", 1) * lay.get("tp", 1) * lay.get("cp", 1))
        results.append(measure(name, lay, cfg, world, args.steps, args.batch_size, task))
    add_columns(results)
    if world.rank == 0:
        print(f"GPT {cfg.n_layer}x{cfg.d_model}, {args.precision}, global batch {args.batch_size}, "
              f"{world.size} rank{'s' if world.size > 1 else ''}; measured columns are the max over ranks")
        print(table(results))
        print("\nThe columns and their words:\n" + legend())
        if args.report:
            write_json({"rows": [{**r, "layout": vars(r["layout"])} for r in results]}, args.report)
            print(f"report written to {args.report}")
        if args.png:
            save_png(results, args.png)
            print(f"chart written to {args.png}")
    return 0


def save_png(results, path):
    from matplotlib.figure import Figure           # no pyplot: no global figure state
    cols = [("memory_x_dp", "memory per rank, x DP"), ("sent_x_dp", "sent per step, x DP"),
            ("lines", "lines of code")]
    fig = Figure(figsize=(12, 3.5))
    axes = fig.subplots(1, len(cols))
    for ax, (key, title) in zip(axes, cols):
        ax.bar([r["name"] for r in results], [r[key] or 0 for r in results])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
