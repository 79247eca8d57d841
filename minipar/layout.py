"""The layout and every rule it must obey, in one place: Layout, validate(cfg, layout, world_size, batch).

A layout (Layout below: dp x pp x cp x tp ranks, ep, ZeRO stage, schedule, micro-batches)
either runs on a model (nn.GPTConfig), a world and a global batch, or is refused here,
before any collective, with one line that is the same on every rank: the rules read only
their arguments, never the network. Each message names the command-line flag of
`minipar.train` (`--tp 3 does not divide --n-head 4`); a library user reads the flag as
the field it sets (--tp: Layout.tp, --n-head: GPTConfig.n_head, --micro-batches:
Layout.micro_batches), and the message says why the rule exists.

    validate                 everything below, in this order (the train job and Engine call it)
    check_grid               dp x pp x cp x tp == the ranks             comm/grid.py's ProcessGrid
    fill_data_parallel       dp = the ranks pp x tp x cp leave over     the train job's --dp default
    check_context_parallel   zigzag chunks, Ulysses heads, SP inside cp  parallel/context/
    check_tensor_parallel    whole heads, whole vocabulary rows, SP      parallel/tensor/megatron.py
    check_schedule           schedule, micro-batches, virtual stages     parallel/pipeline/schedules.py
    check_stages             a block for every pipeline stage            parallel/pipeline/stages.py
    check_message_tags       a distinct tag for every pipeline message   parallel/pipeline/executor.py
    check_experts            ep divides dp and E; what MoE composes with parallel/expert/
    check_zero               stage 0..3; ZeRO-3 with dp only, no experts parallel/zero/, expert/sync.py
    check_batch              the global batch splits into dp x micro-batches  Engine.local_indices

The strategies call their piece directly (a one-line call), so a model sharded by hand
is refused by the same rule, with the same words, as the train job's flags.
"""
import numbers
from dataclasses import dataclass

from minipar.comm.group import RING_TAG

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")   # parallel/pipeline/schedules.py
CP_ALGORITHMS = ("ring", "ulysses")                      # parallel/context/ring_attention.py, ulysses.py
CP_SPLITS = ("zigzag", "contiguous")                     # parallel/context/split.py
ZERO_STAGES = (0, 1, 2, 3)                               # parallel/zero/stages.py
SEQUENCE = "(--seq-len, or 2 x --n-digits for the built-in task)"   # where seq_len comes from


@dataclass
class Layout:
    """How one training job is cut over its ranks: the degrees (world = dp x pp x cp x tp), the
    ZeRO stage, the pipeline schedule and how gradients are synchronised. Checked by validate()."""

    dp: int = 1                    # data-parallel degree
    pp: int = 1                    # pipeline stages
    tp: int = 1                    # tensor-parallel degree
    cp: int = 1                    # context-parallel degree: ranks sharing each sequence
    cp_algo: str = "ring"          # context parallelism: ring (attention) | ulysses (all-to-all)
    cp_split: str = "zigzag"       # which chunks a cp rank holds: zigzag (balanced) | contiguous
    sequence_parallel: bool = False
    zero: int = 0                  # ZeRO stage over the dp (x cp) group: 0 (plain DDP), 1, 2, 3
    offload: bool = False          # ZeRO-Offload: optimizer state and step on the host
    schedule: str = "1f1b"         # pipeline schedule: gpipe | 1f1b | interleaved | zb-h1
    micro_batches: int = 1         # per data-parallel rank per step (gradient accumulation)
    virtual_stages: int = 1        # interleaved schedule: model chunks per pipeline rank
    bucket_bytes: int = 2 ** 20    # DDP gradient bucket size
    overlap: bool = True           # launch bucket all-reduces during backward
    ep: int = 1                    # expert-parallel degree, carved out of dp (MoE: parallel/expert/)
    serial_of_dp: int = 1          # serial oracle of a dp=N MoE run: micro-batch j = every dp rank's j-th

    @property
    def world_size(self):
        return self.dp * self.pp * self.cp * self.tp


class LayoutError(ValueError):
    """A layout that cannot run: one line naming the flags, the same on every rank."""


def validate(cfg, layout, world_size, global_batch=None):
    """Raise LayoutError unless `layout` runs `cfg` on `world_size` ranks (and, if given,
    splits `global_batch` samples). Pure: reads its arguments only."""
    check_grid(world_size, layout.dp, layout.pp, layout.tp, layout.cp)
    check_context_parallel(cfg, layout.cp, layout.cp_algo, layout.cp_split, layout.tp, layout.sequence_parallel)
    check_tensor_parallel(cfg, layout.tp, layout.sequence_parallel)
    check_schedule(layout.schedule, layout.pp, layout.micro_batches, layout.virtual_stages)
    check_stages(cfg.n_layer, layout.pp, layout.virtual_stages)
    check_message_tags(layout.pp, layout.micro_batches, layout.virtual_stages)
    check_experts(cfg.experts, layout.ep, layout.dp, layout.sequence_parallel, layout.cp)
    check_zero(layout, cfg.experts if world_size > 1 else 0)   # one rank: no expert groups, nothing sharded
    if global_batch is not None:
        check_batch(global_batch, layout)


def check_positive(name, value):
    """An integer >= 1 (a degree, a count): `--name value` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LayoutError(f"{flag(name)} {value!r} must be an integer >= 1")


def flag(name):
    """The train job's flag of a Layout / GPTConfig field: micro_batches -> --micro-batches."""
    return "--" + name.replace("_", "-")


def check_grid(size, dp, pp, tp, cp=1):
    """dp * pp * cp * tp == size, every degree an integer >= 1 (the ProcessGrid's ranks)."""
    for name, value in (("dp", dp), ("pp", pp), ("cp", cp), ("tp", tp)):
        check_positive(name, value)
    if dp * pp * cp * tp != size:
        raise LayoutError(f"--dp {dp} x --pp {pp} x --cp {cp} x --tp {tp} = {dp * pp * cp * tp} ranks "
                          f"does not match the {size} ranks it runs on (mpirun -n {size})")


def fill_data_parallel(size, pp, tp, cp):
    """dp when only pp, tp and cp are given: the ranks they leave over."""
    for name, value in (("pp", pp), ("tp", tp), ("cp", cp)):
        check_positive(name, value)
    if size % (pp * tp * cp):
        raise LayoutError(f"--pp {pp} x --tp {tp} x --cp {cp} = {pp * tp * cp} does not divide "
                          f"the {size} ranks")
    return size // (pp * tp * cp)


def check_context_parallel(cfg, cp, algorithm="ring", split="zigzag", tp=1, sequence_parallel=False):
    """Context parallelism (cp ranks share each sequence; Liu et al. 2023 ring, or Ulysses)."""
    check_cp_algorithm(algorithm)
    if cp == 1:
        return
    check_split(cfg.seq_len, cp, split)
    if algorithm == "ulysses":
        check_heads(cfg.n_head, tp, cp)
    if sequence_parallel and (cfg.seq_len // cp) % tp:
        raise LayoutError(f"--sequence-parallel with --cp {cp} cuts each rank's seq_len/cp = "
                          f"{cfg.seq_len // cp} tokens over --tp {tp}: not divisible {SEQUENCE}")


def check_cp_algorithm(algorithm):
    if algorithm not in CP_ALGORITHMS:
        raise LayoutError(f"--cp-algo {algorithm!r} is unknown: expected ring or ulysses")


def check_split(seq_len, cp, kind="zigzag"):
    """The sequence cuts into the split's equal chunks: 2*cp (zigzag: rank i holds chunks i
    and 2cp-1-i, so every rank gets the same share of the causal mask) or cp (contiguous)."""
    if kind not in CP_SPLITS:
        raise LayoutError(f"cp_split {kind!r} is unknown: expected zigzag or contiguous")
    n = 2 * cp if kind == "zigzag" else cp
    if seq_len % n:
        chunks = "2*cp" if kind == "zigzag" else "cp"
        raise LayoutError(f"--cp {cp} cuts the sequence into {chunks} = {n} {kind} chunks: "
                          f"seq_len={seq_len} is not divisible by {n} {SEQUENCE}")


def check_heads(n_head, tp, cp):
    """Ulysses gives each cp rank whole heads of its tp rank's n_head/tp."""
    if n_head % (tp * cp):
        raise LayoutError(f"--cp-algo ulysses gives each rank whole heads: --n-head {n_head} is not divisible "
                          f"by --tp {tp} x --cp {cp} = {tp * cp} (use --cp-algo ring, or fewer cp ranks)")


def check_tensor_parallel(cfg, tp, sequence_parallel=False):
    """Megatron tensor parallelism (Shoeybi et al. 2019): whole heads per rank, whole rows of
    the vocab-parallel embedding; sequence parallelism cuts T into tp equal chunks."""
    if cfg.n_head % tp:
        raise LayoutError(f"--tp {tp} does not divide --n-head {cfg.n_head}: tensor parallelism gives each "
                          f"rank whole heads (n_head % tp must be 0)")
    if cfg.vocab_size % tp:
        raise LayoutError(f"--tp {tp} does not divide the vocabulary of {cfg.vocab_size} tokens: the "
                          f"vocab-parallel embedding gives each rank whole rows (vocab_size % tp; pass --vocab)")
    if sequence_parallel and cfg.seq_len % tp:
        raise LayoutError(f"--sequence-parallel cuts the sequence over --tp {tp}: seq_len={cfg.seq_len} "
                          f"is not divisible by {tp} {SEQUENCE}")


def check_schedule(name, pp, micro_batches, virtual_stages=1):
    """A pipeline schedule (schedules.py) over pp ranks, m micro-batches, v chunks per rank."""
    if name not in SCHEDULES:
        raise LayoutError(f"--schedule {name!r} is unknown: choose one of {', '.join(SCHEDULES)}")
    for arg, value in (("pp", pp), ("micro_batches", micro_batches), ("virtual_stages", virtual_stages)):
        check_positive(arg, value)
    if name != "interleaved" and virtual_stages != 1:
        raise LayoutError(f"--virtual-stages {virtual_stages} needs --schedule interleaved "
                          f"({name} runs one chunk per pipeline rank)")
    if name == "interleaved" and micro_batches % pp:
        raise LayoutError(f"--schedule interleaved needs --micro-batches ({micro_batches}) to be a multiple "
                          f"of --pp {pp} (it runs the micro-batches in rounds of pp)")


def check_stages(n_layer, pp, virtual_stages=1):
    """Every one of the pp * virtual_stages pipeline stages holds at least one block."""
    stages = pp * virtual_stages
    if stages < 1:
        raise LayoutError(f"need at least one pipeline stage, got {stages}")
    if n_layer < stages:
        chunks = f" x --virtual-stages {virtual_stages}" if virtual_stages != 1 else ""
        raise LayoutError(f"--n-layer {n_layer} cannot fill {stages} pipeline stages (--pp {pp}{chunks}): "
                          f"every stage needs at least one block; use --n-layer >= {stages} or fewer stages")


def check_message_tags(pp, micro_batches, virtual_stages=1):
    """The pipeline tags micro-batch mb's message across boundary b in direction d with
    2 * (mb * S + b) + d (executor.message_tag, S = pp * v stages): all of them must stay
    below RING_TAG, the tag ring.py's collectives use, so m * S <= RING_TAG / 2."""
    stages = pp * virtual_stages
    if pp > 1 and 2 * micro_batches * stages > RING_TAG:
        raise LayoutError(f"--micro-batches {micro_batches} x {stages} pipeline stages need more message tags "
                          f"than the {RING_TAG} below ring.py's: use at most --micro-batches "
                          f"{RING_TAG // (2 * stages)}")


def check_experts(experts, ep, dp, sequence_parallel=False, cp=1):
    """Expert parallelism (parallel/expert/groups.py): ep groups are carved out of dp, each of
    the ep ranks holds E/ep whole experts; and what a mixture of experts composes with."""
    check_positive("ep", ep)
    if ep > 1 and not experts:
        raise LayoutError(f"--ep {ep} needs a mixture of experts (--experts > 0)")
    if dp % ep:
        raise LayoutError(f"--ep {ep} does not divide --dp {dp}: expert-parallel groups are carved out of "
                          f"the data-parallel ranks")
    if experts and experts % ep:
        raise LayoutError(f"--ep {ep} does not divide --experts {experts}: each expert-parallel rank holds "
                          f"experts/ep whole experts")
    if experts and sequence_parallel:
        raise LayoutError("--experts with --sequence-parallel is not supported (the MoE layer is "
                          "replicated over tp and needs the whole sequence)")
    if experts and cp > 1:
        raise LayoutError(f"--experts with --cp {cp} is not supported yet (its expert groups are carved "
                          f"out of dp, not dp x cp)")


def check_zero(layout, experts=0):
    """ZeRO (Rajbhandari et al. 2020) over the dp (x cp) group. Stage 3 gathers each unit's
    parameters over dp just in time, which assumes a unit holds whole, unsplit parameters:
    no tp or pp, and no Block holding both dense and expert (edp-sharded) parameters."""
    if layout.zero not in ZERO_STAGES:
        raise LayoutError(f"--zero {layout.zero!r}: the ZeRO stage must be 0, 1, 2 or 3")
    if layout.zero == 3 and (layout.tp > 1 or layout.pp > 1):
        raise LayoutError(f"--zero 3 with --tp {layout.tp} --pp {layout.pp}: ZeRO-3 is supported with data "
                          f"parallelism only (tp = pp = 1); use --zero 1 or 2 with --tp/--pp")
    if layout.zero == 3 and experts:
        raise LayoutError(f"--zero 3 with --experts {experts}: ZeRO-3 with a mixture of experts is not "
                          f"supported (its units, the Blocks, hold dense and expert parameters); "
                          f"use --zero 1 or 2")


def check_batch(global_batch, layout):
    """The global batch splits into dp ranks x micro-batches of equal size (x serial_of_dp:
    the serial oracle of an MoE run at dp=N runs the N ranks' micro-batches)."""
    check_positive("batch_size", global_batch)
    if isinstance(layout.serial_of_dp, bool) or not isinstance(layout.serial_of_dp, numbers.Integral) \
            or layout.serial_of_dp < 1:
        raise LayoutError(f"serial_of_dp={layout.serial_of_dp!r} must be an integer >= 1 (the dp of the "
                          f"run this serial oracle stands for)")
    parts = layout.dp * layout.serial_of_dp * layout.micro_batches
    if global_batch % parts:
        oracle = f" x serial_of_dp {layout.serial_of_dp}" if layout.serial_of_dp > 1 else ""
        raise LayoutError(f"--batch-size {global_batch} does not split into --dp {layout.dp} x "
                          f"--micro-batches {layout.micro_batches}{oracle} equal micro-batches")
