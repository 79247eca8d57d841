# mpirun -n 4 python -m mpi4py tutorials/04_data_parallel.py
# %% [markdown]
# # 04 · Data parallelism: same model, different data, one gradient
#
# Every rank holds the **whole** model. The global batch of B samples is cut
# into N slices, one per rank; rank r computes the gradient g_r of the loss on
# its slice. The update needs the gradient of the loss on the whole batch,
# which (the loss being a mean over equal slices) is
#
#     g = (1/N) Σ_r g_r          one all-reduce (average) over the N ranks
#
# After it, every rank holds the same g, takes the same optimizer step, and the
# N model copies stay identical. That is all of data parallelism; what
# `minipar/parallel/data/ddp.py` adds is doing it *fast*, like PyTorch's
# DDP (Li et al. 2020): gradients live in a few flat **buckets**, and a bucket's
# all-reduce starts the moment its last gradient is ready, while backward is
# still computing the rest (**overlap**).

# %%
import numpy as np

from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree, assert_close, rel_err
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.nn import GPT, GPTConfig
from minipar.parallel.data.ddp import DataParallel

world = Group.world(ledger=CommLedger())
if world.size == 1:                             # one rank splits nothing: say so, do not crash
    raise SystemExit("this tutorial needs 4 ranks: mpirun -n 4 python -m mpi4py tutorials/04_data_parallel.py")
N, r = world.size, world.rank
grid = ProcessGrid(world, N, 1, 1)          # dp = N, no pipeline, no tensor parallelism
dp = grid.dp_group                          # the ranks that average gradients: here, all of them


def say(text):
    """Print once, on rank 0."""
    if r == 0:
        print(text, flush=True)


cfg = GPTConfig(vocab_size=11, seq_len=8, n_layer=2, n_head=4, d_model=16, precision="fp64")
task = ReverseTask(n_digits=4)              # reverse 4 digits: 8 tokens per sample
B = 2 * N                                   # the global batch: 2 samples per rank

# %% [markdown]
# ## 1. Each rank takes its slice of the global batch
#
# Sample i of step s is a pure function of (seed, s, i), so rank r simply asks
# for samples [r·B/N, (r+1)·B/N). Nobody sends data around.

# %%
serial = Engine(cfg, Layout(), OptimConfig())                  # the one-device run: the oracle
ddp_run = Engine(cfg, Layout(dp=N), OptimConfig(), grid=grid)  # this rank's data-parallel share
(mine,) = ddp_run.local_indices(B)                             # (B/N,) sample indices
x, y = task.batch(0, mine)                                     # (B/N, T) inputs and targets
slices = world.allgather_object((mine.tolist(), x[:, :4].tolist()))
say(f"global batch B = {B} over N = {N} ranks")
for rank, (indices, prompts) in enumerate(slices):
    say(f"  rank {rank}: samples {indices}, prompts {prompts}")

# %% [markdown]
# ## 2. Local gradients differ
#
# Each rank runs forward and backward on its slice only. Different data,
# different gradients: the norm of the same parameter's gradient differs by rank.

# %%
local_model = GPT(cfg, seed=0)                                  # a fresh full copy of the model
local_model.loss(x, y).backward()
g_local = {p.name: p.grad.copy() for p in local_model.parameters()}
norms = world.allgather_object(float(np.linalg.norm(g_local["wte.weight"])))
say("||grad of wte.weight|| on each rank's slice: " + "  ".join(f"{n:.5f}" for n in norms))

serial.zero_grad()
x_all, y_all = task.batch(0, np.arange(B))                      # (B, T): the whole batch
serial.model.loss(x_all, y_all).backward()                      # the serial gradient g
g_serial = {p.name: p.grad for p in serial.params}
say(f"||grad of wte.weight|| on the whole batch:   {np.linalg.norm(g_serial['wte.weight']):.5f}")

# %% [markdown]
# ## 3. Bucketed all-reduce: (1/N) Σ g_r = g
#
# `DataParallel` lays the gradients out in flat buckets, in *reverse*
# parameter order, which is roughly the order backward produces them (the
# last layer first). Every `p.grad` becomes a view into its bucket, so backward
# writes straight into the buffer that will be sent. A post-accumulate hook on
# every parameter counts the gradients of its bucket; on the last one it
# launches a non-blocking all-reduce of the whole bucket. We add a hook of our
# own to watch how many buckets are in flight as the gradients arrive.

# %%
model = GPT(cfg, seed=0)
ddp = DataParallel(model.parameters(), dp, bucket_bytes=4096)   # buckets of at most 4 KiB
say(f"\n{len(ddp.buckets)} buckets (reverse parameter order):")
for i, b in enumerate(ddp.buckets):
    say(f"  bucket {i:>2}: {b.buffer.size:>5} elements  {', '.join(p.name for p in b.params)}")

in_flight = []                                                  # after each gradient: buckets launched
for p in model.parameters():
    p.register_post_accumulate_grad_hook(
        lambda p: in_flight.append(sum(b.request is not None for b in ddp.buckets)))

with dp.ledger.measure() as sync_calls:
    model.loss(x, y).backward()                                 # hooks launch buckets as grads arrive
    ddp.finish()                                                # wait for every bucket's all-reduce
say(f"\nbuckets launched, after each of the {len(in_flight)} gradients: {in_flight}")
say("the first all-reduce starts while backward still has gradients to compute")

errors = [rel_err(p.grad, g_serial[p.name]) for p in model.parameters()]
say(f"max relative error of the averaged gradient vs the serial one: {max(errors):.1e}")

# %% [markdown]
# ## 4. What it cost: 2(N-1)/N · Φ per rank
#
# A ring all-reduce of S bytes makes each rank send 2(N-1)/N · S (tutorial 03).
# The buckets together hold every gradient once: S = Φ · 8 bytes in float64.
# The comm ledger recorded every bucket; its total must be the formula exactly.

# %%
phi = model.num_params()
expected = 2 * (N - 1) * phi * 8 / N
sent = sync_calls.total_bytes(group="dp")
say(f"\n{sync_calls.format()}")
say(f"Phi = {phi} parameters; 2(N-1)/N * Phi * 8 = {expected:g} bytes; the ledger says {sent:g}")

# %% [markdown]
# ## 5. One training step, data-parallel vs serial
#
# `Engine` does all of the above inside `train_step`: slice, forward/backward
# with bucketed overlapped all-reduce, then the AdamW step, the same on every
# rank. `lockstep` (minipar/lockstep.py) steps a fresh data-parallel run and a
# fresh serial run side by side; after each step `parity.compare_models`
# compares every parameter, gradient and Adam moment with the serial run, and
# `parity.check` is a collective verdict.

# %%
run = lockstep(cfg, Layout(dp=N), task, B, steps=1, grid=grid)
(loss_ddp, loss_serial), worst = run.losses[0], run.worst
say(f"\nstep 0: loss {loss_ddp:.6f} (serial {loss_serial:.6f}); worst relative error {worst:.1e}")

# %% [markdown]
# ## Checks
# Collective verdicts: every rank reaches the same answer, so none waits forever.

# %%
agree(world, N == 1 or len(set(norms)) == N, f"local gradient norms should differ: {norms}")
for p in model.parameters():
    assert_close(world, f"averaged grad of {p.name}", p.grad, g_serial[p.name], rtol=1e-12)
agree(world, in_flight[0] == 0 and (N == 1 or in_flight[-2] >= 1),
      f"buckets in flight as gradients arrived: {in_flight}")
agree(world, sent == expected, f"the ledger shows {sent} bytes, 2(N-1)/N Phi * 8 = {expected}")
agree(world, worst <= 1e-11, f"one DP step differs from the serial step by {worst}")
say("\nAll checks passed.")
