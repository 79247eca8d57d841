"""What the run reads and writes, and the machine it runs on, checked before the first step.

--data an existing, readable, non-empty text file; --save, --report and --trace paths of
the right kind and writable (a PNG trace needs a pipeline and matplotlib); the plan's
per-rank memory estimate (minipar.plan) within this machine's; --resume a verified
checkpoint of this model, before --steps. Each raises args.UsageError with one line;
files are read, never written, and nothing is communicated: train.agree compares the
ranks' verdicts.
"""
import importlib.util
import os

from minipar import sizing
from minipar.args import UsageError, flag
from minipar.manifest import CheckpointError, check_save_target, read_manifest, writable_dir


def check_data(path):
    """--data: an existing, readable, non-empty regular file."""
    if not os.path.exists(path):
        raise UsageError(f"--data {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"--data {path} is a directory, not a text file")
    if not os.path.isfile(path):
        raise UsageError(f"--data {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise UsageError(f"--data {path} cannot be read: {err.strerror}") from None
    if os.path.getsize(path) == 0:
        raise UsageError(f"--data {path} is empty")


def check_outputs(args, layout):
    """--save, --report, --trace: writable, of the right kind; a PNG trace has matplotlib."""
    if args.save:
        reason = check_save_target(args.save)
        if reason:
            raise UsageError(f"--save {args.save}: {reason}")
    for dest in ("report", "trace"):
        path = getattr(args, dest)
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise UsageError(f"{flag(dest)} {path} is a directory; give a file name")
        if not os.path.isdir(parent):
            raise UsageError(f"{flag(dest)} {path}: the directory {parent} does not exist")
        if not writable_dir(parent) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise UsageError(f"{flag(dest)} {path} is not writable")
    if args.trace and not args.trace.endswith(".json"):     # a Chrome trace works for every layout
        if not args.trace.endswith(".png"):
            raise UsageError(f"--trace {args.trace}: name it *.json (Chrome trace, any layout) "
                             f"or *.png (pipeline Gantt)")
        if layout.pp == 1:
            raise UsageError(f"--trace {args.trace}: the PNG Gantt draws the pipeline schedule and this "
                             f"layout has no pipeline (--pp 1); a *.json trace works for any layout")
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(f"--trace {args.trace} needs matplotlib (pip install matplotlib)")


def check_memory(cfg, layout, args, world_size):
    """Refuse a run whose plan (minipar.plan's per-rank estimate) exceeds this machine's memory."""
    need = sizing.run_bytes_per_rank(cfg, layout, args.batch_size, args.eval_samples, args.check)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    total = need["total"] * world_size                       # the ranks share this machine
    if total > have:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in need.items() if k != "total")
        raise UsageError(f"the run needs at least {gib(need['total'])} GiB per rank ({parts}; minipar.plan's "
                         f"estimate) x {world_size} rank(s), more than this machine's {gib(have)} GiB: "
                         f"lower --batch-size, --eval-samples or the model, or raise --micro-batches")


def gib(nbytes):
    x = nbytes / 2 ** 30
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def check_resume(args, cfg):
    """--resume: a verified checkpoint of this model, saved before --steps."""
    try:
        manifest = read_manifest(args.resume, cfg)
    except CheckpointError as err:
        raise UsageError(f"--resume: {err}") from None
    if manifest.get("seed", args.seed) != args.seed:
        raise UsageError(f"--resume {args.resume} was trained with --seed {manifest['seed']}, "
                         f"this run has --seed {args.seed} (its data and dropout would differ)")
    if args.steps <= manifest["step"]:
        raise UsageError(f"--steps {args.steps} is not beyond the checkpoint's step {manifest['step']} "
                         f"({args.resume}): nothing to train (pass --steps > {manifest['step']})")
