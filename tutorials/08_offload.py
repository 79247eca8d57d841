# mpirun -n 4 python -m mpi4py tutorials/08_offload.py
# %% [markdown]
# # 08 · ZeRO-Offload: the optimizer lives on the host
#
# After ZeRO-2 (tutorial 07) a rank still holds, under mixed precision,
#
#     2Φ fp16 parameters  +  2Φ/N fp16 gradient shard  +  KΦ/N optimizer shard (K = 12)
#
# and the K part, the fp32 master weights and Adam's m and v, is the biggest
# shard by far. ZeRO-Offload (Ren et al. 2021) moves it, and the Adam step that
# reads and writes it, to the host: CPU memory is large and cheap, the Adam
# update is elementwise and cheap too. What it costs is traffic each step:
#
#     device -> host   the fp16 gradient shard      2Φ/N bytes
#     host -> device   the updated fp16 parameters  2Φ/N bytes
#
# In minipar both moves go through `backend.to_host` / `backend.to_device`, so
# the code is the one a GPU run (CuPy) uses; on NumPy they are plain copies.

# %%
from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.formulas import model_state_bytes_formula
from minipar.nn import GPTConfig

world = Group.world(ledger=CommLedger())
if world.size == 1:                             # one rank splits nothing: say so, do not crash
    raise SystemExit("this tutorial needs 4 ranks: mpirun -n 4 python -m mpi4py tutorials/08_offload.py")
N, r = world.size, world.rank
grid = ProcessGrid(world, N, 1, 1)              # dp = N
task = ReverseTask(n_digits=4)
B = 2 * N


def say(text=""):
    """Print once, on rank 0."""
    if r == 0:
        print(text, flush=True)


def config(precision):
    return GPTConfig(vocab_size=11, seq_len=8, n_layer=2, n_head=4, d_model=16, precision=precision)


def zero_run(stage, offload, precision="mixed"):
    """An engine with ZeRO stage `stage` (+ Offload) over all ranks."""
    return Engine(config(precision), Layout(dp=N, zero=stage, offload=offload), OptimConfig(), grid=grid)


# %% [markdown]
# ## 1. Device and host bytes, with and without Offload
#
# The memory ledger keeps a *placement* for every array: "device" or "host".
# Stage 0 with Offload is plain data parallelism whose optimizer (all of it,
# on every rank) runs on the host.

# %%
table = {}
for stage in (0, 1, 2, 3):
    for offload in (False, True):
        if stage == 0 and not offload:
            continue                              # plain DP: tutorial 04
        engine = zero_run(stage, offload)
        engine.train_step(0, task, B)
        zero = engine.optimizer
        led = engine.ledger
        table[stage, offload] = dict(
            device=led.model_state_bytes("device"), host=led.model_state_bytes("host"),
            formula=model_state_bytes_formula(zero.numel_padded, N, stage, "mixed", offload=True)
            if offload else (model_state_bytes_formula(zero.numel_padded, N, stage, "mixed"), 0),
            down=zero.optim.bytes_to_host, up=zero.optim.bytes_to_device, shard=zero.shard_size)
phi = engine.optimizer.numel
say(f"Φ = {phi}, N = {N}, mixed precision (bytes on rank {r})")
say(f"{'stage':<6}{'offload':<9}{'device':>9}{'host':>9}{'formula (device, host)':>26}"
    f"{'to host/step':>14}{'to device/step':>16}")
for (stage, offload), row in table.items():
    formula = f"({row['formula'][0]:.0f}, {row['formula'][1]:.0f})"
    say(f"{stage:<6}{str(offload):<9}{row['device']:>9}{row['host']:>9}{formula:>26}"
        f"{row['down']:>14}{row['up']:>16}")

# %% [markdown]
# With Offload the device keeps only fp16 parameters and gradients; the device
# bytes drop by exactly KΦ/N = 12Φ/N (the optimizer shard), which appears on
# the host. The traffic is the fp16 gradient shard down, the fp16 parameter
# shard up: 2Φ/N bytes each way per step (2Φ at stage 0, where nothing is
# sharded).
#
# ## 2. Same numbers as the serial run
#
# The host step is the same `optim.adamw_update` on the same values, so in
# float64 Offload matches the serial run to rounding, after every step
# (`lockstep`, minipar/lockstep.py: both runs stepped together, compared each step).

# %%
worst = lockstep(config("fp64"), Layout(dp=N, zero=2, offload=True), task, B, steps=3, grid=grid).worst
say(f"\nZeRO-2 + Offload, fp64, 3 steps: worst relative error vs serial {worst:.1e}")

# %% [markdown]
# ## Checks

# %%
for (stage, offload), row in table.items():
    agree(world, (row["device"], row["host"]) == row["formula"], f"stage {stage}: {row} vs formula")
for stage in (1, 2, 3):
    drop = table[stage, False]["device"] - table[stage, True]["device"]
    s = table[stage, True]["shard"]
    agree(world, drop == 12 * s == table[stage, True]["host"], f"stage {stage}: device drop {drop}")
    agree(world, table[stage, True]["down"] == table[stage, True]["up"] == 2 * s, f"traffic {table[stage, True]}")
agree(world, worst <= 1e-12, f"Offload vs serial: {worst}")
say("\nAll checks passed.")
