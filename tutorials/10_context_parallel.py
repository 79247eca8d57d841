# mpirun -n 4 python -m mpi4py tutorials/10_context_parallel.py
# %% [markdown]
# # 10 · Context parallelism: ring attention, zigzag, Ulysses on 4 ranks
#
# Sequence parallelism (tutorial 05) splits T only around LayerNorm and dropout and
# gathers the whole sequence again for attention. Context parallelism splits T for
# the *whole* layer: each of the cp ranks holds T/cp tokens of the same samples.
# Everything but attention is token-wise, so it runs unchanged on those tokens;
# attention needs every earlier key, so the K/V blocks travel around a ring.

# %%
import math

import numpy as np

from minipar import formulas
from minipar.autograd import Tensor
from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.nn import GPTConfig
from minipar.parallel.context import online_softmax as osm
from minipar.parallel.context.ring_attention import RingAttention
from minipar.parallel.context.split import ContextSplit, pair_kind

world = Group.world(ledger=CommLedger())
say = print if world.rank == 0 else (lambda *a, **k: None)
if world.size != 4:
    say("this tutorial needs 4 ranks: mpirun -n 4 python -m mpi4py tutorials/10_context_parallel.py")
    raise SystemExit(0 if world.size == 1 else 2)
CP, T = 4, 16
grid = ProcessGrid(world, dp=1, pp=1, tp=1, cp=CP)
cp = grid.cp_group

# %% [markdown]
# ## What each rank holds
#
# Contiguous: rank r holds tokens [r T/cp, (r+1) T/cp). Zigzag: the sequence is cut
# into 2cp chunks and rank r holds chunks r and 2cp-1-r, an early one and a late one.

# %%
for kind in ("contiguous", "zigzag"):
    say(f"{kind:>10}: " + "  ".join(f"rank {r}: {ContextSplit(T, CP, r, kind).positions().tolist()}"
                                     for r in range(CP)))

# %% [markdown]
# ## One ring step, by hand
#
# Rank r starts with its own K/V block. In each of the cp steps it attends its
# queries to the block it holds, merges the partial result into (o, lse) with the
# log-sum-exp rule, and passes the block on to rank r+1. A chunk pair entirely in
# the future is skipped. We check the merge against full causal attention.

# %%
rng = np.random.default_rng(0)
B, H, D = 1, 2, 4
q, k, v = (rng.standard_normal((B, H, T, D)) for _ in range(3))       # the same on every rank
scale = 1 / math.sqrt(D)
s_full = q @ k.swapaxes(-1, -2) * scale
s_full[..., np.triu(np.ones((T, T), bool), 1)] = -np.inf
p_full = np.exp(s_full - s_full.max(-1, keepdims=True))
full = (p_full / p_full.sum(-1, keepdims=True)) @ v                    # serial causal attention

split = ContextSplit(T, CP, grid.cp_rank, "zigzag")
mine, L = split.positions(), split.chunk_len
kv = np.stack((k[:, :, mine], v[:, :, mine]))                          # (2, B, H, T/cp, D): my block
o, lse = np.zeros((B, H, len(mine), D)), np.full((B, H, len(mine)), -np.inf)
for step in range(CP):
    src = (grid.cp_rank - step) % CP                                    # whose block I hold now
    done = 0
    for a, qc in enumerate(split.chunks()):
        for b, kc in enumerate(split.chunks(src)):
            kind = pair_kind(qc, kc)
            if kind == "skip":
                continue
            rows, cols = slice(a * L, (a + 1) * L), slice(b * L, (b + 1) * L)
            ob, lb = osm.block_forward(q[:, :, mine][:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                                       scale, kind == "diagonal")
            o[:, :, rows], lse[:, :, rows] = osm.merge(o[:, :, rows], lse[:, :, rows], ob, lb)
            done += 1
    err = np.abs(o - full[:, :, mine]).max()
    line = cp.allgather_object(f"rank {grid.cp_rank} holds KV{src}, {done} pair(s), err {err:.1e}")
    say(f"step {step}: " + " | ".join(line))
    nxt = np.empty_like(kv)
    # sendrecv over cp: my K/V block to rank r+1, the next one from rank r-1 (2*B*H*T/cp*D floats)
    kv = cp.sendrecv(kv, (grid.cp_rank + 1) % CP, nxt, (grid.cp_rank - 1) % CP)
merge_err = cp.max_(float(np.abs(o - full[:, :, mine]).max()))
say(f"after {CP} steps every rank's queries equal full attention: max error {merge_err:.1e}")

# RingAttention does the same with Isend/Irecv posted before each block's compute
qkv = np.stack((q, k, v), axis=3).transpose(0, 2, 1, 3, 4).reshape(B, T, H * 3 * D)[:, mine].copy()   # (B, T/cp, H*3D)
ring = RingAttention.apply(Tensor(qkv), n_head=H, split=split, group=cp).data   # (B, T/cp, H*D)
ring_err = cp.max_(float(np.abs(ring - full[:, :, mine].transpose(0, 2, 1, 3).reshape(B, -1, H * D)).max()))
say(f"RingAttention (overlapped Isend/Irecv): max error {ring_err:.1e}")

# %% [markdown]
# ## Load balance: contiguous vs zigzag, measured
#
# Each rank's attention FLOPs, from the ledger its ring attention writes (the FLOPs
# of the chunk pairs that really ran). Contiguous: rank cp-1 does cp times rank 0's
# work. Zigzag: every rank does 2cp+1 small chunk pairs.

# %%
task = ReverseTask(n_digits=T // 2)                                     # T = 16 tokens
cfg = GPTConfig(vocab_size=16, seq_len=task.seq_len, n_layer=2, n_head=4, d_model=16, precision="fp64")
optim = OptimConfig(lr=1e-2)
flops = {}
for kind in ("contiguous", "zigzag"):
    engine = Engine(cfg, Layout(cp=CP, cp_split=kind), optim, seed=0, grid=grid)
    engine.train_step(0, task, 4)
    flops[kind] = cp.allgather_object(engine.model.seq_chunk.work.flops("forward"))
say(f"{'split':<12}" + "".join(f"{'rank ' + str(r):>10}" for r in range(CP)) + f"{'max/min':>9}")
for kind, row in flops.items():
    say(f"{kind:<12}" + "".join(f"{f:>10,}" for f in row) + f"{max(row) / min(row):>9.2f}")

# %% [markdown]
# ## Ring vs Ulysses: traffic per rank, and parity with the serial run
#
# Ulysses swaps the split instead of passing K/V: an all-to-all gives each rank all
# T tokens of H/cp heads (so H must divide by tp*cp), ordinary attention runs, and a
# second all-to-all goes back. Its volume per rank falls as 1/cp; the ring's does not.

# %%
traffic, errs = {}, {}
for algo, formula in (("ring", formulas.cp_ring_comm_elements), ("ulysses", formulas.cp_ulysses_comm_elements)):
    # one step of the cp run and of the serial run, compared (minipar/lockstep.py; the check is no cp traffic)
    with world.ledger.measure() as step:
        errs[algo] = lockstep(cfg, Layout(cp=CP, cp_algo=algo), task, 4, steps=1, grid=grid, optim=optim).worst
    traffic[algo] = (step.total_bytes(group="cp"), sum(formula(4, T, cfg.d_model, CP, 1, cfg.n_layer)) * 8)
    say(f"{algo:<8} cp traffic per rank per step: {traffic[algo][0]:>8,} bytes (formula {traffic[algo][1]:>8,.0f}); "
        f"parity vs serial {errs[algo]:.1e}")

# %%
assert merge_err < 1e-12 and ring_err < 1e-12
assert len(set(flops["zigzag"])) == 1 and flops["contiguous"][-1] == CP * flops["contiguous"][0]
assert all(got == want for got, want in traffic.values())
assert traffic["ulysses"][0] < traffic["ring"][0]
assert max(errs.values()) < 1e-10
say("all checks passed")
