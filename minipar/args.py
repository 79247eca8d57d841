"""The train job's flags: the argparse definition, and flags -> (GPTConfig, Layout, OptimConfig, task).

`build_parser()` is every flag of `python -m minipar.train` with its default (`--help`
shows them). `check_flags` refuses a flag that is wrong on its own (zero, negative, NaN,
inf) or against another flag; `from_flags` fills in the defaults that depend on the world
(the automatic layout, ZeRO-1 with it, 2*pp micro-batches, 2 virtual stages for the
interleaved schedule) and builds the run's dataclasses. The layout rules themselves
(what divides what) are minipar/layout.py's; the files and the machine are inputs.py's.
Everything raises UsageError, one line naming the flag, and never communicates.
"""
import argparse
import math

from minipar.backend import DEVICES
from minipar.comm.grid import default_layout
from minipar.data import make_task
from minipar.engine import Layout, OptimConfig
from minipar.layout import CP_ALGORITHMS, SCHEDULES, ZERO_STAGES, fill_data_parallel
from minipar.nn import GPTConfig

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
    g.add_argument("--cp", type=int, help="context-parallel degree: ranks sharing each sequence (default: 1)")
    g.add_argument("--cp-algo", choices=CP_ALGORITHMS, default="ring",
                   help="context parallelism: ring attention (K/V around a ring) or Ulysses (all-to-all)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard layer norms/dropout along the sequence (default: off)")
    g.add_argument("--zero", type=int, choices=ZERO_STAGES, default=None,
                   help="ZeRO stage over the dp group (default: 1 for the automatic layout, else 0)")
    g.add_argument("--offload", action="store_true",
                   help="ZeRO-Offload: optimizer state and step on the host (with --zero 0: all of it, every rank; default: off)")
    g.add_argument("--schedule", choices=SCHEDULES, default="1f1b",
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


# A flag's own rule goes in one of these tables; a rule between flags goes in check_flags; a
# rule between the layout, the model, the world and the batch is minipar/layout.py's (the
# degrees --dp --pp --tp --cp --ep --micro-batches --virtual-stages and --batch-size too).
AT_LEAST_1 = ("top_k", "moe_every", "n_layer", "n_head", "d_model",
              "seq_len", "vocab", "n_digits", "steps", "log_every", "eval_samples")
AT_LEAST_0 = ("seed", "save_every", "experts")                       # 0 is meaningful: seed 0, no periodic save
POSITIVE_FLOAT = ("lr", "bucket_mb", "capacity_factor")                   # capacity_factor: None is dropless
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
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (value == 0 and dest in POSITIVE_FLOAT):
            raise UsageError(f"{flag(dest)} must be a finite number {'>' if dest in POSITIVE_FLOAT else '>='} 0, "
                             f"got {value}")
    if not (math.isfinite(args.dropout) and 0 <= args.dropout < 1):
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.seq_len is not None and args.data is None:
        raise UsageError("--seq-len applies to --data only (the built-in task's length is 2 x --n-digits)")
    if args.save_every and not args.save:
        raise UsageError("--save-every needs --save DIR")
    if args.experts and args.top_k > args.experts:
        raise UsageError(f"--top-k {args.top_k} is more than --experts {args.experts}")


def choose_layout(args, world_size):
    """(dp, pp, tp, cp): the flags', with dp filling the world when it is not given."""
    if args.dp is None and args.pp is None and args.tp is None and args.cp is None:
        return default_layout(world_size) + (1,)
    pp, tp, cp = (1 if n is None else n for n in (args.pp, args.tp, args.cp))   # not given: 1
    if args.dp is not None:
        return args.dp, pp, tp, cp
    return fill_data_parallel(world_size, pp, tp, cp), pp, tp, cp


def from_flags(args, world_size):
    """(GPTConfig, Layout, OptimConfig, task) of checked flags on `world_size` ranks. Reads
    --data (check it first: inputs.check_data) and raises UsageError or layout.LayoutError."""
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
    optim = OptimConfig(name=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                        max_norm=args.max_norm if args.max_norm > 0 else None)
    return cfg, layout, optim, task
