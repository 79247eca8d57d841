# mpirun -n 4 python -m mpi4py tutorials/07_zero.py
# %% [markdown]
# # 07 · ZeRO: data parallelism without the N copies
#
# Data parallelism (tutorial 04) keeps the whole **model state** on every rank.
# With mixed precision and Adam, per parameter: 2 bytes fp16 weight, 2 bytes
# fp16 gradient, and K = 12 bytes of optimizer state (fp32 master copy, Adam m
# and v): 16Φ bytes for Φ parameters, on each of the N ranks. ZeRO
# (Rajbhandari et al. 2020) keeps 1/N of each on each rank instead:
#
#     stage          partitioned                 bytes per rank
#     0  DP          nothing                     (2 + 2 + K)Φ   = 16Φ
#     1  P_os        optimizer states            (2 + 2)Φ + KΦ/N = 4Φ + 12Φ/N
#     2  P_os+g      + gradients                 2Φ + (2 + K)Φ/N = 2Φ + 14Φ/N
#     3  P_os+g+p    + parameters                (2 + 2 + K)Φ/N = 16Φ/N
#
# Each rank updates only its shard, so gradients need only be *reduce-scattered*
# (rank r gets the average of its slice), and updated parameters all-gathered.
# A ring all-reduce is exactly a reduce-scatter followed by an all-gather, so
# stages 1 and 2 cost what DP costs: 2Φ(N-1)/N elements sent per rank and step.
# Stage 3 gathers each layer's parameters twice, before its forward and again
# before its backward: 3Φ(N-1)/N, 1.5x DP. This tutorial measures all of that
# on 4 ranks with the memory and comm ledgers.

# %%
import numpy as np

from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.formulas import comm_elements_per_step, model_state_bytes_formula
from minipar.layers import Parameter
from minipar.nn import GPTConfig
from minipar.parallel.zero.partition import Partition

world = Group.world(ledger=CommLedger())
if world.size == 1:                             # one rank splits nothing: say so, do not crash
    raise SystemExit("this tutorial needs 4 ranks: mpirun -n 4 python -m mpi4py tutorials/07_zero.py")
N, r = world.size, world.rank
grid = ProcessGrid(world, N, 1, 1)              # dp = N: ZeRO shards over the data-parallel group
task = ReverseTask(n_digits=4)                  # 8 tokens per sample
B = 2 * N                                       # global batch: 2 samples per rank
CATS = ("param", "grad", "master", "optim_m", "optim_v", "padding")


def say(text=""):
    """Print once, on rank 0."""
    if r == 0:
        print(text, flush=True)


def config(precision):
    return GPTConfig(vocab_size=11, seq_len=8, n_layer=2, n_head=4, d_model=16, precision=precision)


# %% [markdown]
# ## 1. Flat buffers, padded, cut into N shards
#
# To cut the model state into N equal, contiguous pieces, ZeRO flattens the
# parameters one after another into one buffer, pads it with zeros to a
# multiple of N, and gives rank r the r-th chunk (`parallel/zero/partition.py`). A chunk
# ignores parameter boundaries. Two parameters of 6 and 4 entries over 4 ranks:

# %%
toy = [Parameter(np.zeros((2, 3)), name="w"), Parameter(np.zeros(4), name="b")]
parts = [Partition([("toy", toy)], N, rank) for rank in range(N)]
unit = parts[0].units[0]
say(f"numel {unit.numel} -> padded {unit.padded} (a multiple of N={N}), chunk {unit.chunk}")
owner = np.concatenate([np.full(unit.chunk, rank) for rank in range(N)])        # (padded,)
labels = ["w"] * 6 + ["b"] * 4 + ["0"] * (unit.padded - unit.numel)
say("entry  " + " ".join(f"{label:>2}" for label in labels))
say("rank   " + " ".join(f"{o:>2}" for o in owner))
say(f"padding entries per rank: {[p.shard_pad for p in parts]}")

# %% [markdown]
# ## 2. One step of each stage: the memory ledger against the formula
#
# Every buffer a stage keeps is registered in the rank's memory ledger by
# category (padding apart). After one mixed-precision training step, the
# model-state bytes of each rank must be the formula exactly, with Φ the
# padded size. This model's Φ divides by N, so no padding is needed here.

# %%
rows, engines = {}, {}
for stage in (0, 1, 2, 3):
    engine = Engine(config("mixed"), Layout(dp=N, zero=stage), OptimConfig(), seed=0, grid=grid)
    with world.ledger.measure() as calls:
        engine.train_step(0, task, B)
    phi = sum(p.data.size for p in engine.params)
    phi_pad = engine.optimizer.numel_padded if stage else phi
    sent = sum(e.bytes for e in calls.entries if e.group == "dp" and e.elements > 1) / 2  # fp16 entries
    rows[stage] = dict(by_cat={c: engine.ledger.current(c) for c in CATS},
                       total=engine.ledger.model_state_bytes(), phi=phi_pad,
                       formula=model_state_bytes_formula(phi_pad, N, stage, "mixed"),
                       sent=sent, sent_formula=comm_elements_per_step(phi_pad, N, stage))
    engines[stage] = engine

phi = rows[0]["phi"]
say(f"Φ = {phi} parameters, N = {N} ranks, mixed precision; bytes on rank {r}:")
say(f"{'stage':<6}" + "".join(f"{c:>9}" for c in CATS) + f"{'total':>9}{'formula':>9}{'in Φ':>9}")
for stage, row in rows.items():
    say(f"{stage:<6}" + "".join(f"{row['by_cat'][c]:>9}" for c in CATS)
        + f"{row['total']:>9}{row['formula']:>9.0f}{row['total'] / phi:>8.2f}Φ")

# %% [markdown]
# Stage 1 keeps full fp16 parameters and gradients (4Φ) but only a quarter of
# the 12Φ optimizer state; stage 2 also drops the gradients it does not own;
# stage 3 keeps a quarter of everything.
#
# ## 3. Communication per step
#
# The comm ledger records every collective with the bytes a ring algorithm
# makes each rank send. DP: one all-reduce of the gradients. ZeRO-1/2: a
# reduce-scatter of the gradients and an all-gather of the updated parameters.
# ZeRO-3: an all-gather of each unit's parameters in forward, another in
# backward, and a reduce-scatter of its gradients.

# %%
say(f"\n{'stage':<6}{'elements sent':>15}{'formula':>10}{'/ DP':>7}")
for stage, row in rows.items():
    say(f"{stage:<6}{row['sent']:>15.0f}{row['sent_formula']:>10.0f}{row['sent'] / rows[0]['sent']:>7.2f}")

# %% [markdown]
# ## 4. Stage 2 frees gradients during backward
#
# Stage 2 groups the gradients in buckets, in the order backward produces them.
# A post-accumulate hook counts each bucket's gradients; when the last one is
# final, the bucket is reduce-scattered at once and the full gradients freed,
# keeping only this rank's averaged chunk. Smaller buckets, lower peak.

# %%
grad_peaks = {}
for bucket_bytes in (2 ** 20, 4096):
    engine = Engine(config("mixed"), Layout(dp=N, zero=2, bucket_bytes=bucket_bytes), OptimConfig(), grid=grid)
    engine.ledger.reset_peak()
    engine.train_step(0, task, B)
    grad_peaks[bucket_bytes] = engine.ledger.peak("grad")
    say(f"{len(engine.optimizer.part.units):>2} bucket(s): gradient bytes peak {engine.ledger.peak('grad'):>6}, "
        f"after the step {engine.ledger.current('grad')} (2Φ = {2 * phi})")

# %% [markdown]
# ## 5. Stage 3 gathers one unit at a time
#
# Stage 3 cuts the model into units: one per transformer Block, and a root
# unit (embeddings, final LayerNorm) that stays gathered through the GPT's
# forward because the tied embedding is used first and last. A unit is
# all-gathered by a forward pre-hook and released by the post-hook; an identity
# Function on its output gathers it again when backward reaches it. So the
# parameter peak is the shard plus the root plus one Block, never the model.

# %%
zero3 = engines[3]
zero3.ledger.reset_peak()
zero3.train_step(1, task, B)
root, *blocks = zero3.optimizer.part.units
peak, shard = zero3.ledger.peak("param"), zero3.ledger.current("param")
say(f"\nZeRO-3 param bytes: shard {shard}, peak during the step {peak} "
    f"= shard + 2 x (root {root.numel} + one block {blocks[0].numel}); the whole model is {2 * phi}")

# %% [markdown]
# ## 6. And it trains the same model
#
# In float64 every stage must equal the serial run after every step (only the
# order of the summation differs): `lockstep` (minipar/lockstep.py) steps both
# runs together and compares them after each step. For the comparison, the
# optimizer's `gathered()` materialises the parameters and averaged gradients
# of a ZeRO run (`parity.compare_models` enters it through `Engine.inspect()`).

# %%
worst = {}
for stage in (1, 2, 3):
    worst[stage] = lockstep(config("fp64"), Layout(dp=N, zero=stage), task, B, steps=3, grid=grid).worst
say("\n" + "  ".join(f"ZeRO-{s}: worst relative error {e:.1e}" for s, e in worst.items()))

# %% [markdown]
# ## Checks

# %%
for stage, row in rows.items():
    agree(world, row["total"] == row["formula"], f"stage {stage}: {row['total']} != {row['formula']}")
    agree(world, np.isclose(row["sent"], row["sent_formula"], rtol=1e-12),
          f"stage {stage}: sent {row['sent']}, formula {row['sent_formula']}")
agree(world, rows[3]["sent"] == 1.5 * rows[1]["sent"], "ZeRO-3 should send 1.5x ZeRO-1")
agree(world, peak == shard + 2 * (root.numel + max(b.numel for b in blocks)), f"ZeRO-3 peak {peak}")
agree(world, grad_peaks[4096] < grad_peaks[2 ** 20], f"small buckets should lower the peak: {grad_peaks}")
agree(world, max(worst.values()) <= 1e-12, f"ZeRO vs serial: {worst}")
say("\nAll checks passed.")
