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
import importlib.util
import math
import os
import sys
import time

import numpy as np

from minipar import checkpoint, plan
from minipar.backend import DEVICES, device_module
from minipar.data import TextTask, make_task
from minipar.comm.group import CommLedger, Group, exit_agreed
from minipar.comm.grid import ProcessGrid, default_layout
from minipar.engine import Engine, Layout, OptimConfig
from minipar.nn import GPTConfig
from minipar.parallel.context.model import check_context_parallel
from minipar.parallel.expert.groups import validate_expert_layout
from minipar.parity import ParityError

PRESETS = {   # name: (n_layer, n_head, d_model)
    "tiny": (4, 4, 64),
    "small": (6, 8, 128),
    "bench": (4, 8, 512),
}


EXIT_USAGE, EXIT_DIVERGED = 2, 3
MAX_SKIPPED_STEPS = 30     # mixed: a loss scale halved 30 times in a row (2^15 -> 2^-15) is no overflow


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
    g.add_argument("--cp", type=int, help="context-parallel degree: ranks sharing each sequence (default: 1)")
    g.add_argument("--cp-algo", choices=("ring", "ulysses"), default="ring",
                   help="context parallelism: ring attention (K/V around a ring) or Ulysses (all-to-all)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard layer norms/dropout along the sequence (default: off)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None,
                   help="ZeRO stage over the dp group (default: 1 for the automatic layout, else 0)")
    g.add_argument("--offload", action="store_true",
                   help="ZeRO-Offload: optimizer state and step on the host (with --zero 0: all of it, every rank; default: off)")
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
    e = p.add_argument_group("mixture of experts (minipar/moe.py, parallel/expert/)")
    e.add_argument("--experts", type=int, default=0, help="E expert MLPs per MoE layer (0: dense)")
    e.add_argument("--top-k", type=int, default=2, help="experts per token (gates renormalised)")
    e.add_argument("--moe-every", type=int, default=1, help="every n-th MLP is an MoE")
    e.add_argument("--aux-loss-coef", type=float, default=0.01, help="Switch load-balancing loss alpha")
    e.add_argument("--capacity-factor", type=float, default=None, help="drop slots over capacity (default dropless)")
    e.add_argument("--ep", type=int, default=1, help="expert-parallel degree, carved out of dp")
    t = p.add_argument_group("training")
    t.add_argument("--data", help="train character-level on this text file (default: the built-in "
                   "task, reversing --n-digits digits)")
    t.add_argument("--n-digits", type=int, default=8, help="built-in task: digits to reverse")
    t.add_argument("--steps", type=int, default=300, help="training steps")
    t.add_argument("--batch-size", type=int, default=32, help="global batch (samples per step)")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="optimizer")
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW)")
    t.add_argument("--max-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights, data and dropout")
    o = p.add_argument_group("output")
    o.add_argument("--log-every", type=int, default=25, help="print a log line every N steps")
    o.add_argument("--eval-samples", type=int, default=256, help="held-out samples for the accuracy")
    o.add_argument("--check", action="store_true",
                   help="compare against the serial run every step (default: off)")
    o.add_argument("--report", help="write a JSON report to this path (default: none)")
    o.add_argument("--trace", help="write the last step's timeline: x.json = Chrome trace (any layout; "
                                   "Perfetto, chrome://tracing), x.png = pipeline Gantt (pp > 1, matplotlib); default: none")
    o.add_argument("--save", metavar="DIR", help="write a checkpoint here at the end, atomically (default: none)")
    o.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: only at the end)")
    o.add_argument("--resume", metavar="DIR", help="continue from this checkpoint, any layout (default: none)")
    return p


# ----------------------------------------------------------------------------- validation
# Everything is checked before the first step, by every rank alike and without any
# communication, so every rank reaches the same verdict (main() then compares them once).
# A flag's rule goes in one of these tables; a rule between flags goes in check_flags.
AT_LEAST_1 = ("dp", "pp", "tp", "cp", "ep", "top_k", "moe_every",
              "micro_batches", "virtual_stages", "n_layer", "n_head", "d_model",
              "seq_len", "vocab", "n_digits", "steps", "batch_size", "log_every", "eval_samples")
AT_LEAST_0 = ("seed", "save_every", "experts")                       # 0 is meaningful: seed 0, no periodic save
POSITIVE_FLOAT = ("lr", "bucket_mb")
NON_NEGATIVE_FLOAT = ("weight_decay", "max_norm", "aux_loss_coef")         # 0: no decay, no clipping


def flag(dest):
    """The flag a user types for argparse's `dest`: batch_size -> --batch-size."""
    return "--" + dest.replace("_", "-")


def check_flags(args):
    """Each flag on its own, then the rules between flags. Zero, negative, NaN and inf are
    errors, never replaced by a default."""
    for dest in AT_LEAST_1 + AT_LEAST_0:
        value, low = getattr(args, dest), 1 if dest in AT_LEAST_1 else 0
        if value is not None and value < low:
            raise UsageError(f"{flag(dest)} must be >= {low}, got {value}")
    for dest in POSITIVE_FLOAT + NON_NEGATIVE_FLOAT:
        value = getattr(args, dest)
        if not math.isfinite(value) or value < 0 or (value == 0 and dest in POSITIVE_FLOAT):
            raise UsageError(f"{flag(dest)} must be a finite number {'>' if dest in POSITIVE_FLOAT else '>='} 0, "
                             f"got {value}")
    if not (math.isfinite(args.dropout) and 0 <= args.dropout < 1):
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.seq_len is not None and args.data is None:
        raise UsageError("--seq-len applies to --data only (the built-in task's length is 2 x --n-digits)")
    if args.save_every and not args.save:
        raise UsageError("--save-every needs --save DIR")
    if args.virtual_stages not in (None, 1) and args.schedule != "interleaved":
        raise UsageError("--virtual-stages > 1 needs --schedule interleaved")


def choose_layout(args, world_size):
    """(dp, pp, tp, cp): the flags', with dp filling the world when it is not given."""
    if args.dp is None and args.pp is None and args.tp is None and args.cp is None:
        return default_layout(world_size) + (1,)
    pp, tp, cp = args.pp or 1, args.tp or 1, args.cp or 1    # None (not given) is 1; 0 was refused already
    if args.dp is not None:
        return args.dp, pp, tp, cp
    if world_size % (pp * tp * cp):
        raise UsageError(f"--pp {pp} x --tp {tp} x --cp {cp} = {pp * tp * cp} does not divide "
                         f"the {world_size} ranks")
    return world_size // (pp * tp * cp), pp, tp, cp


def check_layout(cfg, layout, batch, world_size):
    """Every layout rule, with the flags' names."""
    lay = layout
    if lay.world_size != world_size:
        raise UsageError(f"--dp {lay.dp} x --pp {lay.pp} x --cp {lay.cp} x --tp {lay.tp} = {lay.world_size} "
                         f"ranks, but the job has {world_size} (mpirun -n {world_size})")
    if lay.cp > 1:   # context parallelism: the zigzag split's 2*cp chunks, Ulysses' heads, SP's cut
        try:
            check_context_parallel(cfg, lay.cp, lay.cp_algo, lay.cp_split, lay.tp, lay.sequence_parallel)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if cfg.n_head % lay.tp:
        raise UsageError(f"--n-head {cfg.n_head} is not divisible by --tp {lay.tp}")
    if cfg.vocab_size % lay.tp:
        raise UsageError(f"the vocabulary of {cfg.vocab_size} is not divisible by --tp {lay.tp} (pass --vocab)")
    if lay.sequence_parallel and cfg.seq_len % lay.tp:
        raise UsageError(f"--sequence-parallel needs the sequence length {cfg.seq_len} divisible by --tp {lay.tp}")
    if cfg.n_layer < lay.pp * lay.virtual_stages:
        raise UsageError(f"--n-layer {cfg.n_layer} cannot fill --pp {lay.pp} x --virtual-stages "
                         f"{lay.virtual_stages} = {lay.pp * lay.virtual_stages} pipeline stages")
    if lay.schedule == "interleaved" and lay.micro_batches % lay.pp:
        raise UsageError(f"--schedule interleaved needs --micro-batches ({lay.micro_batches}) "
                         f"to be a multiple of --pp {lay.pp}")
    if lay.zero == 3 and (lay.tp > 1 or lay.pp > 1):
        raise UsageError("--zero 3 is supported with data parallelism only (use --zero 1 or 2 with --tp/--pp)")
    if batch % (lay.dp * lay.micro_batches):
        raise UsageError(f"--batch-size {batch} does not split into --dp {lay.dp} x "
                         f"--micro-batches {lay.micro_batches} equal parts")


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
        reason = checkpoint.check_save_target(args.save)
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
        if not checkpoint.writable_dir(parent) or (os.path.exists(path) and not os.access(path, os.W_OK)):
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
    need = plan.run_bytes_per_rank(cfg, layout, args.batch_size, args.eval_samples, args.check)
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
        manifest = checkpoint.read_manifest(args.resume, cfg)
    except checkpoint.CheckpointError as err:
        raise UsageError(f"--resume: {err}") from None
    if manifest.get("seed", args.seed) != args.seed:
        raise UsageError(f"--resume {args.resume} was trained with --seed {manifest['seed']}, "
                         f"this run has --seed {args.seed} (its data and dropout would differ)")
    if args.steps <= manifest["step"]:
        raise UsageError(f"--steps {args.steps} is not beyond the checkpoint's step {manifest['step']} "
                         f"({args.resume}): nothing to train (pass --steps > {manifest['step']})")


def configure(args, world_size):
    """Validate the whole run and turn flags into (GPTConfig, Layout, OptimConfig, task).
    Raises UsageError with one line; reads files but never communicates."""
    check_flags(args)
    try:
        device_module(args.device)
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    dp, pp, tp, cp = choose_layout(args, world_size)
    auto = args.dp is None and args.pp is None and args.tp is None and args.cp is None
    zero = args.zero if args.zero is not None else (1 if auto and dp > 1 else 0)
    n_layer, n_head, d_model = PRESETS[args.preset]
    n_layer = args.n_layer if args.n_layer is not None else n_layer
    if args.schedule == "interleaved" and args.n_layer is None:
        n_layer = max(n_layer, 2 * pp)                 # room for v = 2 chunks per pipeline rank
    virtual = args.virtual_stages
    if virtual is None:
        virtual = 2 if args.schedule == "interleaved" and n_layer >= 2 * pp else 1
    if args.data is not None:
        check_data(args.data)
    try:
        task = make_task(args.data, args.seq_len, args.seed, args.n_digits)
    except (OSError, ValueError) as err:
        raise UsageError(f"--data {err}" if args.data else str(err)) from None
    vocab = args.vocab if args.vocab is not None else -(-task.vocab_size // 8) * 8
    if vocab < task.vocab_size:
        raise UsageError(f"--vocab {vocab} is smaller than the task's {task.vocab_size} tokens")
    micro = args.micro_batches if args.micro_batches is not None else (2 * pp if pp > 1 else 1)
    n_head = args.n_head if args.n_head is not None else n_head
    d_model = args.d_model if args.d_model is not None else d_model
    if d_model % n_head:
        raise UsageError(f"--d-model {d_model} is not divisible by --n-head {n_head}")
    try:                                   # GPTConfig checks its own fields (one-line ValueErrors)
        cfg = GPTConfig(vocab_size=vocab, seq_len=task.seq_len, n_layer=n_layer,
                        n_head=n_head, d_model=d_model,
                        tied_embeddings=not args.untied, dropout=args.dropout, precision=args.precision,
                        experts=args.experts, top_k=args.top_k, moe_every=args.moe_every,
                        aux_loss_coef=args.aux_loss_coef, capacity_factor=args.capacity_factor)
    except ValueError as err:
        raise UsageError(str(err)) from None
    layout = Layout(dp=dp, pp=pp, tp=tp, cp=cp, cp_algo=args.cp_algo, sequence_parallel=args.sequence_parallel, zero=zero,
                    offload=args.offload, schedule=args.schedule, micro_batches=micro,
                    virtual_stages=virtual, bucket_bytes=int(args.bucket_mb * 2 ** 20),
                    overlap=not args.no_overlap, ep=args.ep)
    check_layout(cfg, layout, args.batch_size, world_size)
    check_experts(cfg, layout)
    check_outputs(args, layout)
    check_memory(cfg, layout, args, world_size)
    if args.resume:
        check_resume(args, cfg)
    optim = OptimConfig(name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                        max_norm=args.max_norm if args.max_norm > 0 else None)
    return cfg, layout, optim, task


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


def check_experts(cfg, layout):
    """The MoE / expert-parallel rules (parallel/expert/groups.py says why ep divides dp and E)."""
    if cfg.experts and cfg.top_k > cfg.experts:
        raise UsageError(f"--top-k {cfg.top_k} is more than --experts {cfg.experts}")
    if cfg.capacity_factor is not None and not (math.isfinite(cfg.capacity_factor) and cfg.capacity_factor > 0):
        raise UsageError(f"--capacity-factor must be a finite number > 0, got {cfg.capacity_factor}")
    try:
        validate_expert_layout(cfg.experts, layout.ep, layout.dp)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.experts and layout.sequence_parallel:
        raise UsageError("a mixture of experts with --sequence-parallel is not supported (the MoE layer "
                         "is replicated over tp and needs the whole sequence)")
    if cfg.experts and layout.cp > 1:
        raise UsageError("a mixture of experts with --cp > 1 is not supported yet (its expert groups are "
                         "carved out of dp, not dp x cp)")
    if cfg.experts and layout.zero == 3 and layout.world_size > 1:
        raise UsageError("ZeRO-3 (--zero 3) with a mixture of experts is not supported; use --zero 1 or 2")


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
    except (UsageError, checkpoint.CheckpointError) as err:
        mine = str(err)
    verdicts = world.allgather_object(mine) if world.size > 1 else [mine]
    message = next((v for v in verdicts if v is not None), None)
    return (result, None) if message is None else (None, message)


def parse_and_configure(argv, world_size):
    args = build_parser().parse_args(argv)
    return args, configure(args, world_size)


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
    from minipar import report
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
    code = main()
    if code:                        # every rank reached this code alike: a clean collective exit,
        exit_agreed(code)           # with no MPI_Abort banner (see comm/group.py)
    sys.exit(0)
