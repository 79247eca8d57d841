"""The closed-form formulas: model-state, activation and communication volume per rank.

With Φ parameters and N the data-parallel degree (ZeRO: Rajbhandari et al. 2020,
"ZeRO: Memory Optimizations Toward Training Trillion Parameter Models";
activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"). Per rank, mixed precision:

    stage 0 (DP)      (2 + 2 + K)Φ         = 16Φ
    stage 1 (P_os)    (2 + 2)Φ + KΦ/N      = 4Φ + 12Φ/N
    stage 2 (P_os+g)  2Φ + (2 + K)Φ/N      = 2Φ + 14Φ/N
    stage 3 (P_os+g+p) (2 + 2 + K)Φ/N      = 16Φ/N

The memory ledger (memory.py) and the comm ledger (comm/ledger.py) of a real
run must agree with these; `python -m minipar.plan` prints them for any size.
"""
import numpy

from minipar.backend import PRECISIONS

OPTIMIZER_STATE = ("master", "optim_m", "optim_v")   # the K·Φ part Offload moves to the host


# ----------------------------------------------------------------------------- ZeRO formulas

def bytes_per_param(precision="mixed"):
    """Bytes per parameter of each model-state category under a policy of
    backend.PRECISIONS: mixed = fp16 param + grad, fp32 master + m + v (K = 12);
    fp32 / fp64 keep no master copy (K = 8 / 16)."""
    try:
        pol = PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}: "
                         f"expected one of {', '.join(PRECISIONS)}") from None
    low, high = numpy.dtype(pol.param_dtype).itemsize, numpy.dtype(pol.master_dtype).itemsize
    return {"param": low, "grad": low, "master": high if pol.has_master else 0,
            "optim_m": high, "optim_v": high}


def padded_numel(phi, n):
    """Length of a flat buffer of Φ elements padded to a multiple of N, so it
    splits into N equal shards: ceil(Φ/N)·N. Padding is this minus Φ."""
    return -(-int(phi) // int(n)) * int(n)


def model_state_breakdown(phi, n, stage, precision="mixed", padded=False):
    """Per-rank bytes {param, grad, master, optim_m, optim_v} for ZeRO `stage`
    (0 = plain DP). Stage s shards: 1 the optimizer states, 2 also the grads,
    3 also the params; a sharded category holds Φ/N elements, or with
    `padded` ceil(Φ/N) (the padding is counted in the category)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if phi < 0 or n < 1:
        raise ValueError(f"need Φ >= 0 and N >= 1, got Φ={phi}, N={n}")
    shard = padded_numel(phi, n) / n if padded else phi / n
    sharded = {"param": stage >= 3, "grad": stage >= 2,
               "master": stage >= 1, "optim_m": stage >= 1, "optim_v": stage >= 1}
    return {cat: size * (shard if sharded[cat] else phi)
            for cat, size in bytes_per_param(precision).items()}


def model_state_bytes_formula(phi, n, stage, precision="mixed", offload=False, padded=False):
    """Model-state bytes per rank (ZeRO paper §5, figure 1): mixed 16Φ,
    4Φ+12Φ/N, 2Φ+14Φ/N, 16Φ/N for stages 0..3; fp32 16Φ, 8Φ+8Φ/N, 4Φ+12Φ/N,
    16Φ/N; fp64 twice fp32. With `offload` (ZeRO-Offload) returns
    (device_bytes, host_bytes): the optimizer part (master + m + v, K·Φ/N when
    sharded) lives on the host."""
    parts = model_state_breakdown(phi, n, stage, precision, padded)
    host = sum(parts[c] for c in OPTIMIZER_STATE)
    total = sum(parts.values())
    return (total - host, host) if offload else total


# ----------------------------------------------------------------------------- communication

def comm_elements_per_step(phi, n, stage):
    """Elements each rank sends per step for gradient sync (ring algorithms).
    DP / ZeRO-1 / ZeRO-2: all-reduce, or reduce-scatter + all-gather: 2Φ(N-1)/N.
    ZeRO-3: reduce-scatter grads + all-gather params in forward and again in
    backward: 3Φ(N-1)/N (1.5x DP)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    return (3 if stage == 3 else 2) * phi * (n - 1) / n


def tp_comm_elements(b, s, h, t, n_layers=1, sequence_parallel=False):
    """Elements each rank sends per micro-batch for Megatron tensor parallelism:
    per layer two all-reduces of b·s·h forward (g after attention and MLP) and
    two backward (f), each 2(t-1)/t·bsh: 8·b·s·h·(t-1)/t. Sequence parallelism
    swaps each all-reduce for a reduce-scatter + all-gather of the same volume
    (Korthikanti et al. §4.2.2) and, as Megatron does, gathers the inputs of the
    two column-parallel matmuls again in backward instead of keeping them whole:
    two more all-gathers of (t-1)/t·bsh, 10·b·s·h·(t-1)/t in all."""
    return (10 if sequence_parallel else 8) * b * s * h * (t - 1) / t * n_layers


def pp_comm_elements(b, s, h, micro_batches=1):
    """Elements sent across one pipeline-stage boundary per step, each direction:
    one b·s·h activation forward (and its gradient backward) per micro-batch."""
    return b * s * h * micro_batches


# ----------------------------------------------------------------------------- activations

def activation_bytes_formula(s, b, h, a, t=1, sequence_parallel=False, bytes_per=2, mask_bytes=1):
    """Activation bytes one transformer layer keeps for backward (Korthikanti et
    al. 2022, §4), for sequence s, micro-batch b, hidden h, heads a, TP degree t.
    The paper's counts are bytes with fp16 activations (2 bytes) and 1-byte
    dropout masks:
        no parallelism  s·b·h·(34 + 5·a·s/h)
        TP              s·b·h·(10 + 24/t + 5·a·s/(h·t))
        TP + SP         s·b·h/t·(34 + 5·a·s/h)
    They come from element counts, which is how other dtypes are handled:
    16·sbh + 2·as²b activation elements (of which 4·sbh, the LayerNorm and
    first-matmul inputs, are replicated under TP without SP) and 2·sbh + as²b
    mask elements (2·sbh replicated). Pass mask_bytes=0 for a model without
    dropout."""
    sbh, as2b = s * b * h, a * s * s * b
    if t == 1 or sequence_parallel:
        replicated, sharded = 0, 16 * sbh + 2 * as2b
        mask_replicated, mask_sharded = 0, 2 * sbh + as2b
    else:
        replicated, sharded = 4 * sbh, 12 * sbh + 2 * as2b
        mask_replicated, mask_sharded = 2 * sbh, as2b
    return (bytes_per * (replicated + sharded / t)
            + mask_bytes * (mask_replicated + mask_sharded / t))


def gb(nbytes):
    """Bytes in GB, 1 GB = 1e9 bytes (the ZeRO paper's unit)."""
    return nbytes / 1e9


# ----------------------------------------------------------------------------- context parallelism

def cp_ring_comm_elements(b, s, h, cp, tp=1, n_layers=1):
    """(forward, backward) elements each rank sends per micro-batch for ring attention
    (parallel/context/ring_attention.py). A K/V block is 2·b·(s/cp)·(h/tp) elements; per
    layer the forward passes it on cp-1 times, the backward passes K/V on cp-1 times and
    the dK/dV accumulators cp times (cp-1 around the ring, one hop home):
        forward   (cp-1)  · 2bsh/(cp·tp)
        backward  (2cp-1) · 2bsh/(cp·tp)"""
    block = 2 * b * s * h // (cp * tp)
    return (cp - 1) * block * n_layers, (2 * cp - 1) * block * n_layers


def cp_ulysses_comm_elements(b, s, h, cp, tp=1, n_layers=1):
    """(forward, backward) elements each rank sends per micro-batch for Ulysses
    (parallel/context/ulysses.py): per layer an all-to-all of the local qkv (3bsh/(cp·tp))
    and one of the attention output (bsh/(cp·tp)), each sending (cp-1)/cp of its buffer;
    backward runs the same two in reverse:  4·bsh/(cp·tp)·(cp-1)/cp each way."""
    each = 4 * b * s * h * (cp - 1) / (cp * cp * tp) * n_layers
    return each, each


def cp_attention_saved_elements(b, s, h, a, cp, tp=1):
    """Elements ring attention saves for backward per layer and rank (no dropout): the
    attention input qkv 3bsh/(cp·tp), exactly 1/cp of the serial core's q, k, v, plus o
    (bsh/(cp·tp)) and the log-sum-exp (b·a·s/(cp·tp)), instead of the serial core's
    a·s²·b/tp softmax matrix."""
    return (3 * b * s * h + b * s * h + b * a * s) // (cp * tp)


def attention_pair_flops(b, heads, q_len, k_len, head_dim, backward=False):
    """Matmul FLOPs of one attention block pair: forward q k^T and p v (4·Lq·Lk·D per head),
    backward S again, dP, dV, dQ, dK (10·Lq·Lk·D)."""
    return (10 if backward else 4) * b * heads * q_len * k_len * head_dim
