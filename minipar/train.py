# mpirun -n 8 python -m mpi4py -m minipar.train      (or: python -m minipar.train for one process)
"""The training job: `mpirun -n N python -m minipar.train [flags]`.

With no flags it trains the built-in reversal task on whatever world it finds:
8 ranks -> dp 2 x pp 2 x tp 2 with ZeRO-1 and the 1F1B schedule; 1 rank -> the
serial model. `--check` also runs the serial model on every rank in lockstep and
prints the parity (max relative difference of loss, every gradient, parameter
and Adam state) on each log line, failing the run if it leaves the tolerance.
Rank 0 alone prints. Configuration is argparse into dataclasses: no exec, no
environment-variable switches.
"""
import argparse
import os
import sys
import time

import numpy as np

from minipar.backend import DEVICES, device_module
from minipar.data import TextTask, make_task
from minipar.dist.comm import CommLedger, Group
from minipar.dist.grid import ProcessGrid, default_layout
from minipar.engine import Engine, Layout, OptimConfig
from minipar.nn import GPTConfig
from minipar.parity import ParityError

PRESETS = {   # name: (n_layer, n_head, d_model)
    "tiny": (4, 4, 64),
    "small": (6, 8, 128),
    "bench": (4, 8, 512),
}


class UsageError(Exception):
    """Bad flags or inputs: reported as one line, exit code 2, on every rank."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help appends "(default: X)" to every flag; a flag whose default is None (chosen at run
    time) or off says its default in its own help text instead."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = Parser(prog="minipar.train", description="Train a GPT with data, tensor, pipeline and ZeRO parallelism.",
               formatter_class=ShowDefaults)
    g = p.add_argument_group("layout (default: chosen from the world size)")
    g.add_argument("--dp", type=int, help="data-parallel degree (default: the ranks left over by pp and tp)")
    g.add_argument("--pp", type=int, help="pipeline stages (default: 1, or 2 in the 8-rank automatic layout)")
    g.add_argument("--tp", type=int, help="tensor-parallel degree (default: 1, or 2 in the 8-rank automatic layout)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard layer norms/dropout along the sequence (default: off)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None,
                   help="ZeRO stage over the dp group (default: 1 for the automatic layout, else 0)")
    g.add_argument("--offload", action="store_true",
                   help="ZeRO-Offload: optimizer state and step on the host (default: off)")
    g.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved", "zb-h1"), default="1f1b",
                   help="pipeline schedule")
    g.add_argument("--micro-batches", type=int, default=None, help="micro-batches per dp rank (default: 2*pp)")
    g.add_argument("--virtual-stages", type=int, default=None,
                   help="model chunks per pipeline rank (interleaved; default 2 if the layers allow, else 1)")
    g.add_argument("--collectives", choices=("mpi", "ring"), default="mpi", help="MPI's own or ring.py's")
    g.add_argument("--bucket-mb", type=float, default=1.0, help="DDP gradient bucket size in MiB")
    g.add_argument("--no-overlap", action="store_true",
                   help="all-reduce after backward instead of during it (default: overlap)")
    g.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (NumPy), gpu (CuPy), strict (CPU stand-in that enforces CuPy's rules)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="model shape: " + ", ".join(f"{k} = {v[0]} layers x {v[1]} heads x d {v[2]}"
                                                    for k, v in PRESETS.items()))
    m.add_argument("--n-layer", type=int, help="transformer blocks (default: the preset's)")
    m.add_argument("--n-head", type=int, help="attention heads (default: the preset's)")
    m.add_argument("--d-model", type=int, help="model width (default: the preset's)")
    m.add_argument("--seq-len", type=int,
                   help="context length (default: 64 for --data; the built-in task fixes it at 2 x --n-digits)")
    m.add_argument("--vocab", type=int, help="vocabulary size (default: the task's, rounded up to a multiple of 8)")
    m.add_argument("--untied", action="store_true",
                   help="separate lm_head instead of tied embeddings (default: tied)")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout probability")
    m.add_argument("--precision", choices=("fp64", "fp32", "mixed"), default="fp64",
                   help="fp64 (parity to ~1e-12), fp32, or mixed (fp16 params, fp32 master)")
    t = p.add_argument_group("training")
    t.add_argument("--data", help="train character-level on this text file (default: the built-in "
                   "task, reversing --n-digits digits)")
    t.add_argument("--n-digits", type=int, default=8, help="built-in task: digits to reverse")
    t.add_argument("--steps", type=int, default=300, help="training steps")
    t.add_argument("--batch-size", type=int, default=32, help="global batch (samples per step)")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="optimizer")
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW)")
    t.add_argument("--max-norm", type=float, default=1.0, help="gradient clipping (<= 0: off)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights, data and dropout")
    o = p.add_argument_group("output")
    o.add_argument("--log-every", type=int, default=25, help="print a log line every N steps")
    o.add_argument("--eval-samples", type=int, default=256, help="held-out samples for the accuracy")
    o.add_argument("--check", action="store_true",
                   help="compare against the serial run every step (default: off)")
    o.add_argument("--report", help="write a JSON report to this path (default: none)")
    o.add_argument("--trace", help="draw the pipeline Gantt chart to this PNG, needs matplotlib (default: none)")
    o.add_argument("--save", metavar="DIR", help="write a checkpoint here at the end, atomically (default: none)")
    o.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    o.add_argument("--resume", metavar="DIR", help="continue from this checkpoint, any layout (default: none)")
    return p


def configure(args, world_size):
    """Turn flags into (GPTConfig, Layout, OptimConfig, task); raise UsageError on bad input."""
    auto = args.dp is None and args.pp is None and args.tp is None
    if auto:
        dp, pp, tp = default_layout(world_size)
    else:
        dp, pp, tp = args.dp or 1, args.pp or 1, args.tp or 1
        if args.dp is None:
            dp = max(world_size // (pp * tp), 1)
    zero = args.zero if args.zero is not None else (1 if auto and dp > 1 else 0)
    n_layer, n_head, d_model = PRESETS[args.preset]
    n_layer = args.n_layer or n_layer
    if args.schedule == "interleaved" and args.n_layer is None:
        n_layer = max(n_layer, 2 * pp)                 # room for v = 2 chunks per pipeline rank
    if args.virtual_stages is None:
        args.virtual_stages = 2 if args.schedule == "interleaved" and n_layer >= 2 * pp else 1
    for flag in ("steps", "batch_size", "log_every", "virtual_stages", "n_digits", "eval_samples"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    try:
        device_module(args.device)
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    if args.resume and not os.path.isfile(os.path.join(args.resume, "manifest.json")):
        raise UsageError(f"no checkpoint at {args.resume} (missing manifest.json)")
    try:
        task = make_task(args.data, args.seq_len, args.seed, args.n_digits)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    vocab = args.vocab or -(-task.vocab_size // 8) * 8
    if vocab < task.vocab_size:
        raise UsageError(f"--vocab {vocab} is smaller than the task's {task.vocab_size} tokens")
    micro = args.micro_batches or (2 * pp if pp > 1 else 1)
    try:
        cfg = GPTConfig(vocab_size=vocab, seq_len=task.seq_len, n_layer=n_layer,
                        n_head=args.n_head or n_head, d_model=args.d_model or d_model,
                        tied_embeddings=not args.untied, dropout=args.dropout, precision=args.precision)
        layout = Layout(dp=dp, pp=pp, tp=tp, sequence_parallel=args.sequence_parallel, zero=zero,
                        offload=args.offload, schedule=args.schedule, micro_batches=micro,
                        virtual_stages=args.virtual_stages, bucket_bytes=int(args.bucket_mb * 2 ** 20),
                        overlap=not args.no_overlap)
        validate(cfg, layout, args.batch_size, world_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    optim = OptimConfig(name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                        max_norm=args.max_norm if args.max_norm > 0 else None)
    return cfg, layout, optim, task


def validate(cfg, layout, batch, world_size):
    """Every layout rule, checked identically on every rank before any collective."""
    if layout.world_size != world_size:
        raise ValueError(f"dp*pp*tp = {layout.dp}*{layout.pp}*{layout.tp} = {layout.world_size} "
                         f"does not match the {world_size} ranks")
    if cfg.n_head % layout.tp:
        raise ValueError(f"n_head={cfg.n_head} is not divisible by tp={layout.tp}")
    if cfg.vocab_size % layout.tp:
        raise ValueError(f"vocab={cfg.vocab_size} is not divisible by tp={layout.tp} (pass --vocab)")
    if layout.sequence_parallel and cfg.seq_len % layout.tp:
        raise ValueError(f"sequence parallelism needs seq_len={cfg.seq_len} divisible by tp={layout.tp}")
    if cfg.n_layer < layout.pp * layout.virtual_stages:
        raise ValueError(f"{cfg.n_layer} layers cannot fill pp*virtual_stages = "
                         f"{layout.pp * layout.virtual_stages} pipeline stages")
    if layout.schedule == "interleaved" and layout.micro_batches % layout.pp:
        raise ValueError(f"the interleaved schedule needs micro-batches ({layout.micro_batches}) "
                         f"to be a multiple of pp={layout.pp}")
    if layout.virtual_stages > 1 and layout.schedule != "interleaved":
        raise ValueError("--virtual-stages > 1 needs --schedule interleaved")
    if layout.zero == 3 and (layout.tp > 1 or layout.pp > 1):
        raise ValueError("ZeRO-3 is supported with data parallelism only (use --zero 1 or 2 with tp/pp)")
    if batch % (layout.dp * layout.micro_batches):
        raise ValueError(f"global batch {batch} does not split into dp={layout.dp} x "
                         f"micro-batches={layout.micro_batches} equal parts")


def chance(task):
    """The accuracy of guessing, said with how it was computed."""
    if isinstance(task, TextTask):
        train, val = task.ids["train"], task.ids["val"]
        top = int(np.bincount(train, minlength=task.vocab_size).argmax())
        unigram = float((val[1:] == top).mean())
        return (f"chance: uniform 1/{task.vocab_size} = {1 / task.vocab_size:.3f}; unigram baseline "
                f"(always {task.decode([top])!r}, the commonest training character) {unigram:.3f}")
    return "chance: 1/10 = 0.100, a uniform guess among the 10 digits"


def sample(engine, task, n=80):
    """Greedy continuation of a held-out window: (prompt, n generated characters). Collective."""
    window = task.batch(0, np.arange(1), split="val")[0]               # (1, T) ids
    prompt, out = task.decode(window[0]), []
    for _ in range(n):
        nxt = int(engine.predict(window)[0, -1])                       # (1, T) -> the last position
        out.append(nxt)
        window = np.concatenate([window[:, 1:], [[nxt]]], axis=1)       # (1, T): slide by one
    return prompt, task.decode(out)


def main(argv=None):
    world = Group.world(ledger=CommLedger())
    say = print if world.rank == 0 else (lambda *a, **k: None)
    try:
        args = build_parser().parse_args(argv)
        cfg, layout, optim, task = configure(args, world.size)
    except UsageError as err:
        if world.rank == 0:
            print(f"minipar.train: error: {err}", file=sys.stderr, flush=True)
        return 2
    world = world.using(algorithm=args.collectives)
    from minipar import report
    grid = ProcessGrid(world, layout.dp, layout.pp, layout.tp) if world.size > 1 else None
    tracer = report.make_tracer(grid.pp_rank) if layout.pp > 1 else None
    engine = Engine(cfg, layout, optim, args.seed, grid, tracer, device=args.device)
    serial = Engine(cfg, Layout(micro_batches=1), optim, args.seed, device=args.device) if args.check else None
    checker = world.using(ledger=CommLedger(), name="check")   # verdict traffic kept out of the run's ledger
    say(report.header(cfg, layout, optim, task, grid, engine), flush=True)

    first = 0
    if args.resume:
        from minipar import checkpoint
        try:
            first = checkpoint.load(args.resume, engine)
            if serial is not None:
                checkpoint.load(args.resume, serial)
        except checkpoint.CheckpointError as err:    # every rank reads the same files: all fail alike
            say(f"minipar.train: error: {err}", file=sys.stderr, flush=True)
            return 2
        say(f"resumed from {args.resume} at step {first}", flush=True)
    acc0 = engine.accuracy(task, args.eval_samples)
    say(f"held-out accuracy before training: {acc0:.3f}", flush=True)
    losses, step_times, parity_errs, start = [], [], [], time.perf_counter()
    tokens, failure = args.batch_size * cfg.seq_len, None
    for step in range(first, args.steps):
        t0 = time.perf_counter()
        loss = engine.train_step(step, task, args.batch_size)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss)
        line = (f"step {step:5d} | loss {loss:.4f} | {tokens / step_times[-1]:9.0f} tok/s | "
                f"{time.perf_counter() - start:6.1f} s")
        if serial is not None:
            serial_loss = serial.train_step(step, task, args.batch_size)
            try:
                parity_errs.append(report.parity(engine, serial, checker, loss, serial_loss, step))
            except ParityError as err:                 # a collective verdict: every rank is here
                failure = str(err)
                say(line, flush=True)
                break
            line += f" | parity {parity_errs[-1]:.2e}"
        if step % args.log_every == 0 or step == args.steps - 1:
            say(line, flush=True)
        if args.save and args.save_every and (step + 1) % args.save_every == 0:
            from minipar import checkpoint
            checkpoint.save(args.save, engine, step + 1, world)
    acc1 = engine.accuracy(task, args.eval_samples)
    say(f"held-out accuracy after training: {acc1:.3f} ({chance(task)})", flush=True)
    if args.data is not None:
        prompt, text = sample(engine, task)                  # collective: every rank runs the forwards
        say(f"sample (greedy, after a held-out prompt):\n  prompt    {prompt[-48:]!r}\n  continues {text!r}",
            flush=True)
    summary = report.summarize(args, cfg, layout, optim, engine, world, tracer, losses, step_times,
                               acc0, acc1, parity_errs, failure)
    say(report.format_summary(summary), flush=True)
    if args.save:
        from minipar import checkpoint
        checkpoint.save(args.save, engine, len(losses) + first, world)
        say(f"checkpoint written to {args.save}", flush=True)
    if args.trace and tracer is not None and world.rank == 0:
        report.save_trace_png(summary, args.trace)
    if args.report and world.rank == 0:
        report.write_json(summary, args.report)
        say(f"report written to {args.report}")
    return 1 if (summary["parity"] or {}).get("ok") is False else 0


if __name__ == "__main__":
    code = main()
    if code == 2:                   # a usage error every rank detected alike: exit without MPI_Abort noise
        from minipar.dist.comm import exit_agreed
        exit_agreed(code)
    sys.exit(code)
