# python -m minipar.plan --params 7.5e9 --gpus 64
"""Plan a training run on paper: memory and communication per GPU, per strategy.

    python -m minipar.plan --params 7.5e9 --gpus 64          # ZeRO paper, figure 1
    python -m minipar.plan --table1                          # ZeRO paper, Table 1
    python -m minipar.plan --gpus 64 --tp 8 --pp 2 --micro-batches 8 \\
        --layers 32 --hidden 4096 --heads 32 --seq 2048 --batch 1 --vocab 50304

Model states use the ZeRO formulas of formulas.py with N = the data-parallel
degree gpus / (tp·pp), each model-parallel rank holding Φ/(tp·pp) parameters
(an even split: the embedding is not special-cased). Activations use
Korthikanti et al. 2022 for the first pipeline stage under 1F1B, which keeps
min(p, m) micro-batches of L/p layers. Communication counts the elements one
GPU sends per step with ring collectives. 1 GB = 1e9 bytes, as in the paper.

Φ from a model shape (GPT, Megatron's count): 12·L·h² + (V + s)·h, i.e.
attention 4h² + MLP 8h² per layer plus token and position embeddings (the
output layer tied to the token embedding). `--biases` adds 13·L·h + 2h for
linear biases and LayerNorm weights.

This file is the command line and the sections beyond model states (activations,
communication, MoE); the model-state tables are zero_tables.py, Φ is sizing.py.
"""
import argparse
import math
import sys

from minipar.formulas import (activation_bytes_formula, bytes_per_param, comm_elements_per_step,
                              cp_ring_comm_elements, cp_ulysses_comm_elements, gb,
                              model_state_bytes_formula, pp_comm_elements, tp_comm_elements)
from minipar.sizing import ACTIVATION_BYTES, gpt_param_count, moe_param_counts
from minipar.zero_tables import STAGES, figure1_round, print_table1, print_zero_table


# ----------------------------------------------------------------------------- report sections

def print_activations(args, dp):
    bytes_per = ACTIVATION_BYTES[args.precision]
    s, b, h, a, t = args.seq, args.batch, args.hidden, args.heads, args.tp
    in_flight = min(args.pp, args.micro_batches)
    layers = args.layers // args.pp
    print("Activation memory per GPU (Korthikanti et al. 2022, §4; "
          f"{bytes_per}-byte activations, 1-byte dropout masks)")
    print(f"  s = {s}, b = {b} per micro-batch, h = {h}, a = {a}, t = {t}, p = {args.pp}, "
          f"{dp} DP ranks; 1F1B first stage keeps {in_flight} micro-batch(es) x {layers} layers")
    rows = (("no TP", "sbh(34 + 5as/h)", 1, False),
            (f"TP t={t}", "sbh(10 + 24/t + 5as/(ht))", t, False),
            (f"TP+SP t={t}", "sbh/t(34 + 5as/h)", t, True))
    cp = args.cp
    if cp > 1:   # every activation of a cp rank covers its s/cp tokens (attention: its s/cp query rows)
        rows += ((f"TP+SP+CP c={cp}", "sbh/(tc)(34 + 5as/h)", t, True),)
    print(f"  {'':<16}{'per layer':<28}{'GB/layer':>10}{'GB/GPU':>10}")
    for label, text, tp, sp in rows:
        layer = activation_bytes_formula(s, b, h, a, t=tp, sequence_parallel=sp, bytes_per=bytes_per)
        layer = layer / cp if "CP" in label else layer
        print(f"  {label:<16}{text:<28}{_fmt(gb(layer)):>10}{_fmt(gb(layer * layers * in_flight)):>10}")


def print_communication(args, phi, dp):
    grad_bytes = bytes_per_param(args.precision)["grad"]
    act_bytes = ACTIVATION_BYTES[args.precision]
    b, s, h, m = args.batch, args.seq, args.hidden, args.micro_batches
    phi = phi / (args.tp * args.pp)
    rows = (("DP / ZeRO-1 / ZeRO-2", "2Φ(N-1)/N", comm_elements_per_step(phi, dp, 0), grad_bytes),
            ("ZeRO-3", "3Φ(N-1)/N", comm_elements_per_step(phi, dp, 3), grad_bytes),
            (f"TP t={args.tp}", "8bsh(t-1)/t x L/p x m",
             tp_comm_elements(b, s, h, args.tp, args.layers // args.pp) * m, act_bytes),
            (f"TP+SP t={args.tp}", "10bsh(t-1)/t x L/p x m",
             tp_comm_elements(b, s, h, args.tp, args.layers // args.pp, True) * m, act_bytes),
            (f"PP p={args.pp}", "bsh x m, each direction",
             pp_comm_elements(b, s, h, m) if args.pp > 1 else 0, act_bytes))
    if args.cp > 1:
        c, layers = args.cp, args.layers // args.pp
        rows += ((f"CP ring c={c}", "2bsh/(ct)(3c-2) x L/p x m",
                  sum(cp_ring_comm_elements(b, s, h, c, args.tp, layers)) * m, act_bytes),
                 (f"CP Ulysses c={c}", "8bsh(c-1)/(c²t) x L/p x m",
                  sum(cp_ulysses_comm_elements(b, s, h, c, args.tp, layers)) * m, act_bytes))
    print(f"Communication per step, sent by one GPU (ring collectives; N = {dp}, m = {m} micro-batches)")
    print(f"  {'strategy':<22}{'elements':<24}{'count':>12}{'GB':>10}")
    for label, text, elements, size in rows:
        print(f"  {label:<22}{text:<24}{elements:>12.4g}{_fmt(gb(elements * size)):>10}")


def print_moe(args, phi, dp):
    """Parameters total vs active, model states per GPU with experts over ep (dense over N =
    dp, experts over N/ep), and the all-to-all volume with uniform routing."""
    h, m_layers = args.hidden, args.layers // args.moe_every
    total, active = moe_param_counts(phi, args.layers, h, args.experts, args.top_k, args.moe_every)
    expert = m_layers * args.experts * 8 * h ** 2               # all experts' weights
    dense = (total - expert) / (args.tp * args.pp)              # per GPU, dense part
    local = expert / (args.ep * args.pp)                        # per GPU: E/ep experts, whole over tp
    print(f"Mixture of experts: E = {args.experts}, top-{args.top_k}, every {args.moe_every} MLP(s), ep = {args.ep}")
    print(f"  total Φ {total:,.4g}  active per token {active:,.4g}  ({active / total:.1%}); "
          f"per GPU: dense {dense:,.4g} + experts {local:,.4g} (E/ep experts, replicated over tp)")
    print(f"  {'strategy':<18}{'GB/GPU':>8}   dense over N = {dp}, experts over N/ep = {dp // args.ep}")
    for label, stage in STAGES[:3]:
        nbytes = model_state_bytes_formula(dense, dp, stage, args.precision) + \
            model_state_bytes_formula(local, dp // args.ep, stage, args.precision)
        print(f"  {label:<18}{figure1_round(gb(nbytes)):>8}")
    a2a = 4 * args.batch * args.seq * args.top_k * h * (args.ep - 1) / args.ep * m_layers // args.pp
    print(f"  all-to-all per step (uniform routing): 4·b·s·k·h·(ep-1)/ep x {m_layers // args.pp} layers x m "
          f"= {a2a * args.micro_batches:.4g} elements, "
          f"{_fmt(gb(a2a * args.micro_batches * ACTIVATION_BYTES[args.precision]))} GB")


def _fmt(x):
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


# ----------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad input: one line on stderr, exit code 2, no traceback, no usage dump."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind):
    def parse(text):
        try:
            value = float(text) if kind is float else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


SHAPE = ("layers", "hidden", "heads", "seq", "batch", "vocab")


def build_parser():
    p = _Parser(prog="python -m minipar.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=_positive(float), help="Φ, the parameter count (e.g. 7.5e9)")
    p.add_argument("--gpus", type=_positive(int), help="total GPUs; N = gpus / (tp·pp)")
    p.add_argument("--precision", choices=("mixed", "fp32", "fp64"), default="mixed")
    p.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer states on the host")
    p.add_argument("--table1", action="store_true", help="print the ZeRO paper's Table 1")
    for name, help_ in zip(SHAPE, ("transformer layers L", "hidden size h", "attention heads a",
                                   "sequence length s", "micro-batch size b", "vocabulary size V")):
        p.add_argument(f"--{name}", type=_positive(int), help=help_)
    p.add_argument("--biases", action="store_true", help="count biases and LayerNorms in Φ")
    p.add_argument("--tp", type=_positive(int), default=1, help="tensor-parallel degree t")
    p.add_argument("--pp", type=_positive(int), default=1, help="pipeline-parallel degree p")
    p.add_argument("--cp", type=_positive(int), default=1, help="context-parallel degree c (N = gpus/(tp·pp·cp))")
    p.add_argument("--micro-batches", type=_positive(int), default=1, help="micro-batches m per step")
    p.add_argument("--experts", type=_positive(int), help="MoE: E experts per MoE layer (needs the shape)")
    p.add_argument("--top-k", type=_positive(int), default=2, help="MoE: experts per token k")
    p.add_argument("--moe-every", type=_positive(int), default=1, help="MoE: every n-th MLP")
    p.add_argument("--ep", type=_positive(int), default=1, help="MoE: expert-parallel degree (divides N)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [name for name in SHAPE if getattr(args, name) is not None]
    if given and len(given) < len(SHAPE):
        parser.error("the model shape needs all of " + ", ".join(f"--{n}" for n in SHAPE)
                     + "; missing " + ", ".join(f"--{n}" for n in SHAPE if n not in given))
    if not args.table1 and args.gpus is None:
        parser.error("--gpus is required (or --table1)")
    if args.gpus is not None and args.gpus % (args.tp * args.pp * args.cp):
        parser.error(f"--gpus {args.gpus} is not a multiple of tp·pp·cp = {args.tp * args.pp * args.cp}")
    if given and (args.layers % args.pp or args.heads % args.tp):
        parser.error(f"need layers % pp == 0 and heads % tp == 0, got L={args.layers}, "
                     f"p={args.pp}, a={args.heads}, t={args.tp}")
    if args.experts and not given:
        parser.error("--experts needs the model shape (" + " ".join(f"--{n}" for n in SHAPE) + ")")
    if args.experts and (args.experts % args.ep or args.top_k > args.experts
                         or args.gpus is None or (args.gpus // (args.tp * args.pp)) % args.ep):
        parser.error("MoE needs --gpus, ep dividing E and N = gpus / (tp·pp), and top-k <= E")
    phi = args.params
    if phi is None and given:
        phi = gpt_param_count(args.layers, args.hidden, args.vocab, args.seq, biases=args.biases)
        print(f"Φ = 12·L·h² + (V + s)·h{' + 13·L·h + 2h' if args.biases else ''} = {phi:,} parameters\n")
    if phi is None and args.gpus is not None:
        parser.error("give --params, or the model shape (" + " ".join(f"--{n}" for n in SHAPE) + ")")

    if args.table1:
        print_table1()
    if args.gpus is not None:
        if args.table1:
            print()
        dp = args.gpus // (args.tp * args.pp * args.cp)   # cp ranks sync gradients like dp ranks
        print_zero_table(phi, dp, args.precision, args.offload, model_parallel=args.tp * args.pp)
        if given:
            print()
            print_activations(args, dp)
            print()
            print_communication(args, phi, dp)
            if args.experts:
                print()
                print_moe(args, phi, dp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
