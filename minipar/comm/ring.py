"""Ring collectives built from point-to-point Sendrecv (Patarasuk & Yuan 2009).

The n ranks of a group sit on a ring: rank r sends only to r+1 and receives
only from r-1. The buffer is cut into n equal chunks; in every step each rank
passes ONE chunk to its right neighbour, so every link is busy all the time
and no rank ever sends more than S/n bytes at once.

    reduce-scatter  n-1 steps: pass a partial sum on, add the one that arrives.
                    Afterwards rank r holds chunk r summed over all ranks.
    all-gather      n-1 steps: pass a finished chunk on, keep the one arriving.
                    Afterwards every rank holds every chunk.
    all-reduce      reduce-scatter, then all-gather.

Bytes one rank sends, S = bytes of the full buffer:

    reduce-scatter  (n-1) * S/n
    all-gather      (n-1) * S/n
    all-reduce      2(n-1) * S/n   -> tends to 2S however many ranks there are:
                                      the reason the ring is bandwidth-optimal

Example, n = 4, after reduce-scatter step s rank r holds the partial sum of
chunk (r-s-2) mod n over ranks r-s-1 ... r (s+2 contributions):

    step  rank 0      rank 1      rank 2      rank 3
     0    c2: 3+0     c3: 0+1     c0: 1+2     c1: 2+3
     1    c1: 2+3+0   c2: 3+0+1   c3: 0+1+2   c0: 1+2+3
     2    c0: all     c1: all     c2: all     c3: all      <- rank r owns chunk r

These functions work in place on flat, contiguous host buffers, and talk via
`group.raw_sendrecv`, which the comm ledger does not see: the Group method
that called them records the one logical collective, with the same bytes as
MPI's own algorithm would be charged.
"""
import numpy as np


def _chunks(group, flat):
    """View a flat (n*c,) buffer as its n chunks: (n, c), chunk j = elements j*c ... (j+1)*c - 1."""
    if flat.size % group.size:
        raise ValueError(f"ring over {group.size} ranks needs a buffer divisible into "
                         f"{group.size} chunks, got {flat.size} elements")
    return flat.reshape(group.size, flat.size // group.size)  # (n, c)


def ring_reduce_scatter_(group, flat, ufunc=np.add, on_step=None):
    """Reduce-scatter in place: afterwards chunk `rank` of flat holds ufunc over all ranks'
    chunk `rank` (the other chunks hold partial sums). Returns that chunk (a view, (c,)).

    on_step(phase, step, chunks), if given, is called after every step (for teaching)."""
    n, r = group.size, group.rank
    chunks = _chunks(group, flat)              # (n, c)
    right, left = (r + 1) % n, (r - 1) % n
    arriving = np.empty_like(chunks[0])        # (c,)
    for step in range(n - 1):
        # I send the chunk I finished adding last step (at step 0: my own chunk r-1),
        # which holds the sum over ranks r-step ... r (step+1 contributions),
        # and receive chunk r-step-2 from the left, summed over ranks r-step-1 ... r-1.
        send_j, recv_j = (r - step - 1) % n, (r - step - 2) % n
        # moves S/n bytes to the right neighbour, S/n arrive from the left
        group.raw_sendrecv(chunks[send_j], right, arriving, left)
        # now chunk recv_j has step+2 contributions: ranks r-step-1 ... r
        ufunc(chunks[recv_j], arriving, out=chunks[recv_j])
        if on_step is not None:
            on_step("reduce-scatter", step, chunks)
    # after n-1 steps: chunk (r-(n-2)-2) mod n = r, with all n contributions
    return chunks[r]


def ring_all_gather_(group, flat, on_step=None):
    """All-gather in place: on entry chunk `rank` of flat is this rank's; on exit every chunk
    is filled, chunk j from rank j. Returns flat."""
    n, r = group.size, group.rank
    chunks = _chunks(group, flat)              # (n, c)
    right, left = (r + 1) % n, (r - 1) % n
    for step in range(n - 1):
        # I send the chunk I got last step (at step 0: my own chunk r),
        # and receive chunk r-step-1, which started on rank r-step-1.
        send_j, recv_j = (r - step) % n, (r - step - 1) % n
        # moves S/n bytes to the right neighbour, S/n arrive from the left
        group.raw_sendrecv(chunks[send_j], right, chunks[recv_j], left)
        # now I hold chunks r-step-1 ... r: step+2 of the n
        if on_step is not None:
            on_step("all-gather", step, chunks)
    return flat


def ring_all_reduce_(group, flat, ufunc=np.add, on_step=None):
    """All-reduce in place = ring reduce-scatter, then ring all-gather. Any size: the buffer is
    zero-padded to n*c elements (padding only ever meets padding, so any ufunc is safe).
    Returns flat."""
    n = group.size
    c = -(-flat.size // n)                     # ceil(size / n): elements per chunk
    if n == 1 or c == 0:
        return flat
    work = flat
    if flat.size != n * c:
        work = np.zeros(n * c, flat.dtype)     # (n*c,) padded copy of (size,)
        work[:flat.size] = flat
    ring_reduce_scatter_(group, work, ufunc, on_step)
    ring_all_gather_(group, work, on_step)
    if work is not flat:
        flat[...] = work[:flat.size]
    return flat
