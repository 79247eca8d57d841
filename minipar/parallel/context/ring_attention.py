"""Ring attention (Liu et al. 2023), forward and backward, with explicit point-to-point calls.

Each of the cp ranks holds T/cp tokens of q, k and v (its chunks, split.py). The K/V
blocks travel around the ring while every rank attends to the block it holds:

    step s = 0 .. cp-1: rank r holds the K/V block of rank (r - s) mod cp
        post  irecv(next block  <- rank r-1),  isend(this block -> rank r+1)
        compute its query chunks against this block's chunks   (overlaps the transfer)
        merge into (o, lse) with the log-sum-exp rule          (online_softmax.py)
        wait; the received block becomes the held one

    rank:      0        1        2        3          cp = 4: each block visits every
    s = 0    KV0      KV1      KV2      KV3          rank once; cp-1 transfers per rank
    s = 1    KV3      KV0      KV1      KV2
    s = 2    KV2      KV3      KV0      KV1
    s = 3    KV1      KV2      KV3      KV0

A chunk pair entirely in the future is skipped (split.pair_kind): no matmul runs for
it, and `AttentionWork` records the FLOPs that did run, so the contiguous split's
imbalance and the zigzag split's balance are measured, not assumed.

Backward runs the same ring again. With the K/V block travels its gradient
accumulator dK/dV: each rank adds its queries' contribution and passes both on; after
the last step one more hop sends every accumulator home to the block's owner.

Traffic per rank per layer and micro-batch, with a K/V block of 2·b·(s/cp)·(h/tp)
elements (formulas.cp_ring_comm_elements):

    forward    (cp-1) K/V blocks                        2·b·s·h/(cp·tp)·(cp-1)
    backward   (cp-1) K/V blocks + cp dK/dV blocks      2·b·s·h/(cp·tp)·(2cp-1)

Saved for backward: this rank's qkv (3·b·s·h/(cp·tp)), o (b·s·h/(cp·tp)), lse
(b·a·s/(cp·tp)) and the dropout mask rows of its queries; never a (T, T) score matrix.
"""
import math

from minipar.autograd import Function
from minipar.backend import array_module, like
from minipar.comm.request import Request
from minipar.parallel.context import online_softmax as osm
from minipar.parallel.context.split import DIAGONAL, SKIP, pair_kind

KV_TAG, DKV_TAG, HOME_TAG = 101, 102, 103     # cp-group message tags: K/V, dK/dV on the way, dK/dV home


class AttentionWork:
    """The attention FLOPs this rank computed: one entry per chunk pair that ran."""

    def __init__(self):
        self.entries = []                     # (phase, kind, flops): phase forward | backward

    def record(self, phase, kind, flops):
        self.entries.append((phase, kind, flops))

    def flops(self, phase="forward"):
        return sum(f for ph, _, f in self.entries if ph == phase)

    def pairs(self, phase="forward"):
        return sum(1 for ph, _, _ in self.entries if ph == phase)

    def reset(self):
        self.entries.clear()


def block_chunks(split, src):
    """The chunk indices of the K/V block that came from cp rank `src`, in its order."""
    return split.chunks(src)


def send_home(group, dkv):
    """The last hop: each accumulator goes to the next rank, which owns that block."""
    home = array_module(dkv).empty_like(dkv)
    # sendrecv over cp: the finished dK/dV (2*b*H/tp*T/cp*D elements) to its owner, mine from rank r-1
    return group.sendrecv(dkv, (group.rank + 1) % group.size, home, (group.rank - 1) % group.size, HOME_TAG)


def _pairs(split, src):
    """(query rows, key cols in the block, key chunk, masked) of every pair that is computed."""
    L = split.chunk_len
    for a, qc in enumerate(split.chunks()):
        for b, kc in enumerate(block_chunks(split, src)):
            kind = pair_kind(qc, kc)
            if kind != SKIP:
                yield slice(a * L, (a + 1) * L), slice(b * L, (b + 1) * L), kc, kind


def _shift(group, buf, tag):
    """Post the ring transfer of `buf`: (fresh receive buffer, requests)."""
    xp, n, r = array_module(buf), group.size, group.rank
    nxt = xp.empty_like(buf)
    # irecv over cp: the next block (buf's size) from rank r-1; isend: this one to rank r+1
    return nxt, [group.irecv_(nxt, source=(r - 1) % n, tag=tag), group.isend(buf, dest=(r + 1) % n, tag=tag)]


class RingAttention(Function):
    """Causal attention of this rank's queries against the whole sequence, K/V passed in a ring.

    qkv: (B, T/cp, H*3*D) head-major packed, this rank's tokens (split.positions());
    keep: (B, H, T/cp, T) attention-dropout mask rows of its queries (serial columns), or None.
    Returns (B, T/cp, H*D)."""

    @staticmethod
    def forward(ctx, qkv, n_head, split, group, keep=None, p=0.0, work=None):
        xp, (B, Tl, F) = array_module(qkv), qkv.shape
        D, L = F // (3 * n_head), split.chunk_len
        q, k, v = qkv.reshape(B, Tl, n_head, 3, D).transpose(3, 0, 2, 1, 4)   # 3 x (B, H, T/cp, D)
        scale, drop = 1.0 / math.sqrt(D), None if keep is None else keep * (1.0 / (1.0 - p))
        kv = xp.ascontiguousarray(xp.stack((k, v)))                            # (2, B, H, T/cp, D)
        o = xp.zeros(q.shape, dtype=q.dtype)                                   # (B, H, T/cp, D)
        lse = xp.full(q.shape[:-1], -xp.inf, dtype=q.dtype)                    # (B, H, T/cp)
        for s in range(group.size):
            src = (group.rank - s) % group.size
            nxt, pending = _shift(group, kv, KV_TAG) if s < group.size - 1 else (None, [])
            for rows, cols, kc, kind in _pairs(split, src):
                d = None if drop is None else drop[:, :, rows, kc * L:(kc + 1) * L]   # (B, H, L, L)
                o_b, lse_b = osm.block_forward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                               scale, kind == DIAGONAL, d)
                o[:, :, rows], lse[:, :, rows] = osm.merge(o[:, :, rows], lse[:, :, rows], o_b, lse_b)
                if work is not None:
                    work.record("forward", kind, osm.FORWARD_MATMULS * 2 * B * n_head * L * L * D)
            Request.wait_all(pending)
            kv = kv if nxt is None else nxt
        ctx.save_for_backward(qkv, o, lse, keep)
        ctx.n_head, ctx.split, ctx.group, ctx.p, ctx.work, ctx.scale = n_head, split, group, p, work, scale
        return o.transpose(0, 2, 1, 3).reshape(B, Tl, n_head * D)             # (B, T/cp, H*D)

    @staticmethod
    def backward(ctx, g):
        qkv, o, lse, keep = ctx.saved
        group, split, H, L = ctx.group, ctx.split, ctx.n_head, ctx.split.chunk_len
        xp, (B, Tl, F) = array_module(g), qkv.shape
        D = F // (3 * H)
        q, k, v = qkv.reshape(B, Tl, H, 3, D).transpose(3, 0, 2, 1, 4)       # 3 x (B, H, T/cp, D)
        drop = None if keep is None else keep * (1.0 / (1.0 - ctx.p))
        do = g.reshape(B, Tl, H, D).transpose(0, 2, 1, 3)                      # (B, H, T/cp, D)
        delta = (do * o).sum(axis=-1)                                          # (B, H, T/cp)
        dq = xp.zeros(q.shape, dtype=q.dtype)
        kv = xp.ascontiguousarray(xp.stack((k, v)))                            # (2, B, H, T/cp, D)
        dkv = xp.zeros(kv.shape, dtype=kv.dtype)       # the held block's dK, dV so far
        for s in range(group.size):
            src = (group.rank - s) % group.size
            last = s == group.size - 1
            nxt, pending = _shift(group, kv, KV_TAG) if not last else (None, [])
            if not last:
                nxt_dkv = xp.empty_like(dkv)
                # irecv over cp: the next block's dK/dV accumulator (kv's size) from rank r-1
                pending.append(group.irecv_(nxt_dkv, source=(group.rank - 1) % group.size, tag=DKV_TAG))
            for rows, cols, kc, kind in _pairs(split, src):
                d = None if drop is None else drop[:, :, rows, kc * L:(kc + 1) * L]   # (B, H, L, L)
                dq_b, dk_b, dv_b = osm.block_backward(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                                      do[:, :, rows], lse[:, :, rows], delta[:, :, rows],
                                                      ctx.scale, kind == DIAGONAL, d)
                dq[:, :, rows] += dq_b
                dkv[0][:, :, cols] += dk_b
                dkv[1][:, :, cols] += dv_b
                if ctx.work is not None:
                    ctx.work.record("backward", kind, osm.BACKWARD_MATMULS * 2 * B * H * L * L * D)
            if last:
                dkv = send_home(group, dkv)
                break
            # isend over cp: the held block's dK/dV, with this rank's share added, on to rank r+1
            pending.append(group.isend(dkv, dest=(group.rank + 1) % group.size, tag=DKV_TAG))
            Request.wait_all(pending)
            kv, dkv = nxt, nxt_dkv
        dqkv = xp.stack((dq, dkv[0], dkv[1]), axis=3)                          # (B, H, T/cp, 3, D)
        return dqkv.transpose(0, 2, 1, 3, 4).reshape(B, Tl, H * 3 * D)         # (B, T/cp, H*3*D)


def ring_attention(qkv, n_head, split, group, keep=None, p=0.0, work=None):
    """Ring attention of a Tensor qkv (B, T/cp, H*3*D); keep: host mask rows (B, H, T/cp, T)."""
    keep = None if keep is None else like(keep, qkv.data)       # host-drawn mask -> the data's device
    return RingAttention.apply(qkv, n_head=n_head, split=split, group=group, keep=keep, p=p, work=work)
