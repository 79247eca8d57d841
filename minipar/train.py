# mpirun -n 8 python -m mpi4py -m minipar.train      (or: python -m minipar.train for one process)
"""The training job: `mpirun -n N python -m minipar.train [flags]`.

With no flags it trains the built-in reversal task on whatever world it finds:
8 ranks -> dp 2 x pp 2 x tp 2 with ZeRO-1 and the 1F1B schedule; 1 rank -> the
serial model. `--check` also runs the serial model on every rank in lockstep and
prints the parity (max relative difference of loss, every gradient, parameter
and Adam state) on each log line, failing the run if it leaves the tolerance.
Rank 0 alone prints. Configuration is argparse into dataclasses (args.py): no exec,
no environment-variable switches. Every input is checked before the first step, on
every rank alike (`configure`: the flags, layout.py's rules, inputs.py's files and
memory), and a refusal is one line and exit code 2 on every rank.
"""
import math
import sys
import time

import numpy as np

from minipar import checkpoint, report
from minipar.allocator import keep_freed_memory
from minipar.args import UsageError, build_parser, check_flags, from_flags
from minipar.backend import device_module
from minipar.comm.exit import exit_agreed
from minipar.comm.grid import ProcessGrid
from minipar.comm.group import CommLedger, Group
from minipar.data import TextTask
from minipar.engine import Engine, Layout
from minipar.inputs import check_data, check_memory, check_outputs, check_resume
from minipar.layout import LayoutError, validate
from minipar.manifest import CheckpointError
from minipar.parity import ParityError

EXIT_USAGE, EXIT_DIVERGED = 2, 3
MAX_SKIPPED_STEPS = 30     # mixed: a loss scale halved 30 times in a row (2^15 -> 2^-15) is no overflow


# ----------------------------------------------------------------------------- validation
# Everything is checked before the first step, by every rank alike and without any
# communication, so every rank reaches the same verdict (main() then compares them once).
def configure(args, world_size):
    """Validate the whole run and turn flags into (GPTConfig, Layout, OptimConfig, task).
    Raises UsageError with one line; reads files but never communicates."""
    check_flags(args)
    try:
        device_module(args.device)
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    if args.data is not None:
        check_data(args.data)
    try:
        cfg, layout, optim, task = from_flags(args, world_size)
        validate(cfg, layout, world_size, args.batch_size)      # every layout rule (layout.py)
    except LayoutError as err:
        raise UsageError(str(err)) from None
    check_outputs(args, layout)
    check_memory(cfg, layout, args, world_size)
    if args.resume:
        check_resume(args, cfg)
    return cfg, layout, optim, task


def parse_and_configure(argv, world_size):
    args = build_parser().parse_args(argv)
    return args, configure(args, world_size)


def serial_layout(cfg, layout):
    """The serial oracle of --check: one micro-batch; an MoE run's routing statistics are per
    global micro-batch, so its oracle runs the same global micro-batches (Layout.serial_of_dp)."""
    if cfg.experts:
        return Layout(micro_batches=layout.micro_batches, serial_of_dp=layout.dp)
    return Layout(micro_batches=1)


def agree(world, attempt, *args):
    """(attempt(*args), None) on every rank, or (None, the first failing rank's message) on
    every rank if any rank raised UsageError or CheckpointError. One small collective, so a
    verdict that differs between ranks (a file one node cannot read) ends every rank alike."""
    result, mine = None, None
    try:
        result = attempt(*args)
    except (UsageError, CheckpointError) as err:
        mine = str(err)
    verdicts = world.allgather_object(mine) if world.size > 1 else [mine]
    message = next((v for v in verdicts if v is not None), None)
    return (result, None) if message is None else (None, message)


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


def load_checkpoint(path, *engines):
    """Load `path` into each engine; the step to resume at. Reads files, never communicates."""
    return [checkpoint.load(path, e) for e in engines][0]


# ----------------------------------------------------------------------------- the run
def diverged(engine, loss, step, skipped):
    """(why the run must stop or None, consecutive skipped steps). fp64/fp32: a non-finite loss
    or gradient. mixed: the loss scaler skips overflowing steps by design; only a long run of
    them is an error. Loss and gradient norm are the same on every rank: so is the verdict."""
    if engine.scaler is None:
        if not math.isfinite(loss):
            return f"step {step}: the loss is {loss}: the run diverged (try a smaller --lr)", 0
        if not math.isfinite(engine.grad_norm):
            return f"step {step}: a gradient is not finite: the run diverged (try a smaller --lr)", 0
        return None, 0
    skipped = skipped + 1 if not math.isfinite(engine.grad_norm) else 0
    if skipped >= MAX_SKIPPED_STEPS:
        return (f"step {step}: {skipped} steps in a row skipped for non-finite gradients (loss scale now "
                f"{engine.scaler.scale:g}): the run diverged (try a smaller --lr)"), skipped
    return None, skipped


def main(argv=None, world=None):
    """The job on `world` (default: every rank); returns its exit code, the same on every rank:
    0 done, 1 parity failed (--check), 2 bad input (EXIT_USAGE), 3 diverged (EXIT_DIVERGED)."""
    world = world if world is not None else Group.world(ledger=CommLedger(clock=time.perf_counter))  # timed: --trace out.json
    say = print if world.rank == 0 else (lambda *a, **k: None)

    def error(message, code=EXIT_USAGE):
        say(f"minipar.train: error: {message}", file=sys.stderr, flush=True)
        return code

    validated, message = agree(world, parse_and_configure, argv, world.size)
    if message is not None:
        return error(message)
    args, (cfg, layout, optim, task) = validated
    world = world.using(algorithm=args.collectives)
    grid = ProcessGrid(world, layout.dp, layout.pp, layout.tp, layout.cp) if world.size > 1 else None
    tracer = report.make_tracer(grid.pp_rank) if layout.pp > 1 else None
    engine = Engine(cfg, layout, optim, args.seed, grid, tracer, device=args.device)
    serial = Engine(cfg, serial_layout(cfg, layout), optim, args.seed, device=args.device) if args.check else None
    checker = world.using(ledger=CommLedger(), name="check")   # verdict traffic kept out of the run's ledger
    say(report.header(cfg, layout, optim, task, grid, engine), flush=True)

    first = 0
    if args.resume:
        engines = (engine,) if serial is None else (engine, serial)
        first, message = agree(world, load_checkpoint, args.resume, *engines)   # before any step
        if message is not None:
            return error(f"--resume: {message}")
        say(f"resumed from {args.resume} at step {first}", flush=True)
    acc0 = engine.accuracy(task, args.eval_samples)
    say(f"held-out accuracy before training: {acc0:.3f}", flush=True)
    losses, step_times, parity_errs, start = [], [], [], time.perf_counter()
    tokens, failure, skipped = args.batch_size * cfg.seq_len, None, 0
    for step in range(first, args.steps):
        t0 = time.perf_counter()
        with np.errstate(all="ignore"):      # an overflow is diverged()'s to report, in one line
            loss = engine.train_step(step, task, args.batch_size)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss)
        line = (f"step {step:5d} | loss {loss:.4f} | {tokens / step_times[-1]:9.0f} tok/s | "
                f"{time.perf_counter() - start:6.1f} s")
        why, skipped = diverged(engine, loss, step, skipped)
        if why is not None:                  # the same verdict on every rank; nothing is saved
            say(line, flush=True)
            return error(why, EXIT_DIVERGED)
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
        checkpoint.save(args.save, engine, len(losses) + first, world)
        say(f"checkpoint written to {args.save}", flush=True)
    if args.trace and step_times:       # .json: Chrome trace (any layout); else a PNG Gantt (pp > 1)
        say(report.save_trace(args.trace, summary, world, grid, tracer, (step, t0, t0 + step_times[-1])))
    if args.report and world.rank == 0:
        report.write_json(summary, args.report)
        say(f"report written to {args.report}")
    return 1 if (summary["parity"] or {}).get("ok") is False else 0


if __name__ == "__main__":
    keep_freed_memory()             # this program owns the process: keep freed memory for the next step
    code = main()
    if code:                        # every rank reached this code alike: a clean collective exit,
        exit_agreed(code)           # with no MPI_Abort banner (see comm/exit.py)
    sys.exit(0)
