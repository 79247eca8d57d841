# mpirun -n 4 python -m mpi4py tutorials/03_collectives.py
# %% [markdown]
# # 03 · Collectives: a ring all-reduce, step by step
#
# Data parallelism ends every step with an **all-reduce**: each of the n ranks
# holds a gradient buffer of S bytes and every rank needs the sum of all n.
# The ring algorithm (Patarasuk & Yuan 2009; what NCCL runs on a ring) cuts
# the buffer into n chunks and does it in two halves:
#
# 1. **reduce-scatter**, n-1 steps: each rank passes one partial sum to its
#    right neighbour and adds the one arriving from its left. Afterwards rank r
#    owns chunk r, summed over all ranks.
# 2. **all-gather**, n-1 steps: each rank passes one finished chunk on, and
#    keeps the one arriving. Afterwards every rank has every chunk.
#
# Every step, every rank sends S/n bytes, so each rank sends
# 2(n-1)·S/n in total: less than 2S however many ranks there are.
# The code is `minipar/comm/ring.py`; here we watch it run.

# %%
import numpy as np

from minipar.comm import ring
from minipar.comm.group import CommLedger, Group
from minipar.parity import agree, assert_close

world = Group.world()
if world.size == 1:                             # one rank splits nothing: say so, do not crash
    raise SystemExit("this tutorial needs 4 ranks: mpirun -n 4 python -m mpi4py tutorials/03_collectives.py")
n, r = world.size, world.rank


def say(text):
    """Print once, on rank 0."""
    if r == 0:
        print(text, flush=True)


# %% [markdown]
# ## Watching the chunks move
#
# Rank r fills its whole buffer with 2^r. A sum of such numbers spells out in
# binary which ranks went into it: 2^0 + 2^3 = 9 = 0b1001 means "ranks 0 and 3".
# After each step, every rank sends rank 0 the contributors of each of its
# chunks (a small Python object: `allgather_object`) and rank 0 prints a table.

# %%
def contributors(value):
    """'0+3' for 2^0 + 2^3: which ranks' data a partial sum holds."""
    return "+".join(str(k) for k in range(n) if int(value) >> k & 1)


def show(phase, step, chunks):
    """on_step callback of ring.py: every rank reports its (n, c) chunks, rank 0 prints."""
    mine = [contributors(chunk[0]) for chunk in chunks]       # one label per chunk
    table = world.allgather_object(mine)                      # n lists of n labels, to every rank
    say(f"\n{phase + ' step ' + str(step):<22}" + "".join(f"{'chunk ' + str(j):>10}" for j in range(n)))
    for rank, labels in enumerate(table):
        say(f"{'  rank ' + str(rank):<22}" + "".join(f"{label:>10}" for label in labels))


c = 2                                                          # elements per chunk
x = np.full(n * c, 2.0 ** r)                                   # (n*c,): chunk j = x[j*c:(j+1)*c]
say(f"{n} ranks, each with {n} chunks of {c} elements; rank r starts with 2^r everywhere.")
ring.ring_all_reduce_(world, x, on_step=show)
agree(world, np.all(x == 2.0 ** n - 1), f"rank {r}: expected every element to be {2 ** n - 1}, got {x}")
say(f"\nEvery rank now holds {2 ** n - 1} = " + contributors(2 ** n - 1) + " everywhere.")

# %% [markdown]
# Read the reduce-scatter tables diagonally: at step s, rank r has just
# finished adding into chunk (r-s-2) mod n, which then holds the s+2 ranks
# r-s-1 ... r. After n-1 steps rank r owns chunk r complete. The all-gather
# then passes the complete chunks around the same ring.
#
# ## Same answer as MPI, same bytes
#
# `Group(algorithm="ring")` runs these loops; `algorithm="mpi"` calls MPI's own
# Allreduce. Both record the same thing in the comm ledger: the bytes one rank
# sends under a ring, 2(n-1)/n · S for an all-reduce of S bytes.

# %%
by_mpi = world.using(ledger=CommLedger(), algorithm="mpi")
by_ring = world.using(ledger=CommLedger(), algorithm="ring")

grads = np.random.default_rng(r).normal(size=840)              # (840,) float64: S = 6720 bytes
S = grads.nbytes
summed_by_mpi = by_mpi.all_reduce(grads)
summed_by_ring = by_ring.all_reduce(grads)
assert_close(world, "ring all-reduce vs MPI Allreduce", summed_by_ring, summed_by_mpi, rtol=1e-12)

# reduce-scatter then all-gather, by hand: the two halves of the ring
my_chunk = by_ring.reduce_scatter(grads)                       # (840/n,): chunk r of the sum
rebuilt = by_ring.all_gather(my_chunk)                         # (840,): every chunk
assert_close(world, "reduce-scatter + all-gather vs MPI Allreduce", rebuilt, summed_by_mpi, rtol=1e-12)

say(f"\nS = {S} bytes over n = {n} ranks. The ring's ledger:\n{by_ring.ledger.format()}")
say(f"all-reduce:          2(n-1)/n * S = {2 * (n - 1) * S / n:g} bytes sent per rank")
say(f"reduce-scatter + all-gather: 2 * (n-1)/n * S = {2 * ((n - 1) * S / n):g}: the same")
say(f"for comparison, sending the whole buffer to each other rank: (n-1) * S = {(n - 1) * S}")

# %% [markdown]
# ## Checks
# The tutorial ends in assertions, as collective verdicts (every rank agrees).

# %%
ring_bytes = by_ring.ledger.total_bytes(op="all_reduce")
agree(world, ring_bytes == 2 * (n - 1) * S / n, f"ring all-reduce sent {ring_bytes} bytes")
agree(world, by_mpi.ledger.total_bytes(op="all_reduce") == ring_bytes, "MPI and ring ledgers differ")
halves = by_ring.ledger.total_bytes(op="reduce_scatter") + by_ring.ledger.total_bytes(op="all_gather")
agree(world, halves == ring_bytes, f"reduce-scatter + all-gather sent {halves} bytes, not {ring_bytes}")
say("\nAll checks passed.")
