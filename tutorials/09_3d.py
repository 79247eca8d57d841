# mpirun -n 8 python -m mpi4py tutorials/09_3d.py
# %% [markdown]
# # 09 · 3D parallelism: dp x pp x tp on 8 ranks
#
# Eight ranks form a 2 x 2 x 2 grid. Tensor parallelism (tp) varies fastest, so
# a tp pair is two neighbouring ranks (on a real cluster: one node, fast links);
# then the pipeline stage (pp); then the data-parallel replica (dp):
#
#     rank = (d * pp + p) * tp + t
#
# Each rank holds: half of the heads and half of the MLP of the layers of *its*
# pipeline stage, and sees half of the global batch. ZeRO-1 then shards the
# optimizer state of those parameters over its dp partner.

# %%
from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.nn import GPTConfig

world = Group.world(ledger=CommLedger())
say = print if world.rank == 0 else (lambda *a, **k: None)
if world.size != 8:
    say("this tutorial needs 8 ranks: mpirun -n 8 python -m mpi4py tutorials/09_3d.py")
    raise SystemExit(0 if world.size == 1 else 2)

grid = ProcessGrid(world, dp=2, pp=2, tp=2)
say(grid.describe())

# %% [markdown]
# ## What each rank holds
#
# Build the full model from the seed on every rank, then let the engine cut out
# this rank's share: TP slices, then the pipeline stage, then ZeRO-1 shards.

# %%
task = ReverseTask(n_digits=4)
cfg = GPTConfig(vocab_size=16, seq_len=task.seq_len, n_layer=4, n_head=4, d_model=32, precision="fp64")
layout = Layout(dp=2, pp=2, tp=2, zero=1, schedule="1f1b", micro_batches=4)
optim = OptimConfig(lr=3e-3)
engine = Engine(cfg, layout, optim, seed=0, grid=grid)

mine = [f"{p.name}{list(p.data.shape)}" for p in engine.params]
held = world.allgather_object((grid.dp_rank, grid.pp_rank, grid.tp_rank, len(mine),
                               sum(p.data.size for p in engine.params), mine[:3]))
for rank, (d, p, t, n, numel, first) in enumerate(held):
    say(f"rank {rank} (d={d} p={p} t={t}): {n:2d} tensors, {numel:6d} numbers, e.g. {', '.join(first)}")
say(f"serial model: {engine.n_params} numbers")

# %% [markdown]
# Stage 0 holds the embeddings and the first two blocks, stage 1 the last two
# blocks, the final layer norm and (tied) a copy of the token embedding. Every
# split weight is a contiguous slice of the serial weight: `p.spec` says which.

# %%
same_stage = [h for h in held if h[1] == 0]
assert all(h[4] == same_stage[0][4] for h in same_stage), "tp ranks of a stage hold equal shares"

# %% [markdown]
# ## One step, traced
#
# The pipeline runs 1F1B over 4 micro-batches per dp replica; the tensor-parallel
# layers all-reduce inside each F and B; ZeRO-1 reduce-scatters the gradients
# over dp, updates its shard of the Adam state and all-gathers the parameters.

# %%
mark = world.ledger.snapshot()
engine.train_step(0, task, 16)
step = world.ledger.since(mark).summary()
mine = {f"{g}.{op}": (v["calls"], v["bytes"]) for g, ops in step.items() for op, v in ops.items()
        if op != "object"}
say("rank 0 sent in one step:")
for k, (calls, nbytes) in sorted(mine.items()):
    say(f"  {k:<22} {calls:4d} calls {nbytes:10.0f} bytes")


# %% [markdown]
# ## The same numbers as the serial run
#
# `lockstep` (minipar/lockstep.py) trains a fresh 3D run and the serial run side
# by side and, after every step, compares every shard's parameters, gradients and
# Adam moments with its slice of the serial arrays (one collective verdict a step).

# %%
run = lockstep(cfg, layout, task, 16, steps=4, grid=grid, optim=optim)
(loss, serial_loss), err = run.losses[0], run.errors[0]
say(f"loss {loss:.6f} vs serial {serial_loss:.6f}; max relative error over every shard: {err:.2e}")
say(f"after 4 steps: max relative error {run.errors[-1]:.2e}")
assert run.worst < 1e-10
assert any(k.startswith("tp.") for k in mine) and any(k.startswith("pp.") for k in mine)
assert any(k.startswith("dp.") for k in mine)          # ZeRO-1's reduce-scatter and all-gather
say("09_3d: all assertions passed")
