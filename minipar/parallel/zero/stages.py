"""ZeRO stages 0-3 (Rajbhandari et al. 2020): data parallelism without the replicas.

Plain data parallelism keeps everything on each of the N ranks; with mixed
precision and Adam that is 2Φ (fp16 params) + 2Φ (fp16 grads) + KΦ (fp32
master, m, v; K = 12) = 16Φ bytes. ZeRO partitions these model states over
the data-parallel group (partition.py: flat buffers, padded, rank r owns chunk r),
and each rank updates only its shard:

    stage        partitioned      bytes per rank   gradient sync                    after the step
    1  P_os      optimizer states 4Φ + 12Φ/N       reduce-scatter in finish()       all-gather params
    2  P_os+g    + gradients      2Φ + 14Φ/N       reduce-scatter each bucket in    all-gather params
                                                   backward, then free its grads
    3  P_os+g+p  + parameters     16Φ/N            gather a unit before its forward keep the shard
                                                   and its backward; reduce-scatter
                                                   its grads right after

A ring all-reduce *is* a reduce-scatter followed by an all-gather, so stages 1
and 2 send what DP sends, 2Φ(N-1)/N per rank and step; stage 3 gathers the
parameters twice (forward and backward), 3Φ(N-1)/N, 1.5x DP (Φ = Φ_pad, padded;
with M micro-batches stage 3 does all three per micro-batch: it cannot keep full
gradients, so it reduce-scatters after each backward and sums into its shard).
Stage 0 here is ZeRO-Offload on plain DP (zero=0, offload=True): gradients are
all-reduced and every rank updates all of them, on the host.

Each stage is one class, built on the one before: what a stage adds reads as its
own code (base.py holds what they share):

    stage0.py  Zero0  whole flat params and grads, all-reduce, every rank updates all
    stage1.py  Zero1  + the flat buffers cut over dp: reduce-scatter, all-gather after step
    stage2.py  Zero2  + a gradient shard: each bucket reduce-scattered by backward's hooks
    stage3.py  Zero3  + a parameter shard: gather and release around each Block (Regather)

Each is the engine's gradient sync and its optimizer (both contracts of
contracts.py); `make_zero` builds the one a Layout asks for.

ZeRO-3 is supported with data parallelism only (tp = pp = 1); stages 1 and 2
work on whatever local parameters TP / PP leave (over the grid's dp group).
"""
from minipar.layout import check_zero
from minipar.parallel.zero.stage0 import Zero0
from minipar.parallel.zero.stage1 import Zero1
from minipar.parallel.zero.stage2 import Zero2
from minipar.parallel.zero.stage3 import Zero3

STAGES = {0: Zero0, 1: Zero1, 2: Zero2, 3: Zero3}


def make_zero(params, dp_group, layout, optim_cfg, precision, ledger, model=None):
    """The ZeRO stage `layout.zero` over `dp_group` (None: one rank), sync and optimizer in one;
    `model` gives ZeRO-3 its Blocks. Refuses a stage outside 0-3 and ZeRO-3 with tp or pp."""
    check_zero(layout)                     # layout.py: the stage exists, ZeRO-3 without tp / pp
    return STAGES[layout.zero](params, dp_group, layout, optim_cfg, precision, ledger, model)
