# mpirun -n 4 python -m mpi4py tutorials/11_expert_parallel.py
# %% [markdown]
# # 11 · Expert parallelism: a mixture of experts spread over ranks with all-to-all
#
# Each MLP becomes E = 4 expert MLPs and a router (minipar/moe.py). A token goes to
# its top-2 experts, weighted by renormalised gates. Four data-parallel ranks are cut
# into ep groups of 2 (parallel/expert/groups.py): in each ep group rank j holds experts
# 2j and 2j+1, and tokens travel to their experts by Alltoallv and come back the same way.

# %%
import numpy as np

from minipar.autograd import no_grad
from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.moe import top_k
from minipar.nn import GPTConfig

world = Group.world(ledger=CommLedger())
say = print if world.rank == 0 else (lambda *a, **k: None)
if world.size != 4:
    say("this tutorial needs 4 ranks: mpirun -n 4 python -m mpi4py tutorials/11_expert_parallel.py")
    raise SystemExit(0 if world.size == 1 else 2)

task = ReverseTask(n_digits=4)
cfg = GPTConfig(vocab_size=16, seq_len=task.seq_len, n_layer=2, n_head=4, d_model=16,
                experts=4, top_k=2, aux_loss_coef=0.1)
optim = OptimConfig(lr=1e-2)
grid = ProcessGrid(world, dp=4, pp=1, tp=1)
engine = Engine(cfg, Layout(dp=4, ep=2), optim, seed=0, grid=grid)
serial = Engine(cfg, Layout(serial_of_dp=4), optim, seed=0)

# %% [markdown]
# ## The routing table of a few tokens (serial model, layer 0)
#
# p = softmax(x W_router); the top-2 probabilities are renormalised into gates.

# %%
seen = {}
serial.model.blocks[0].mlp.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].data))
with no_grad():
    serial.model(task.batch(0, np.arange(1))[0])
rows = seen["x"].reshape(-1, cfg.d_model)[:6]                      # (6, C): the first 6 tokens
logits = rows @ serial.model.blocks[0].mlp.router.weight.data
probs = np.exp(logits - logits.max(1, keepdims=True))
probs /= probs.sum(1, keepdims=True)
chosen = top_k(probs, cfg.top_k)
say("token   p(e0)  p(e1)  p(e2)  p(e3)   experts   gates")
for t in range(6):
    gates = probs[t, chosen[t]] / probs[t, chosen[t]].sum()
    say(f"{t:5d}  " + " ".join(f"{p:6.3f}" for p in probs[t]) + f"    {chosen[t].tolist()}   "
        + " ".join(f"{g:.3f}" for g in gates))

# %% [markdown]
# ## What each rank holds
#
# The router and every dense weight are replicated; the experts are the serial arrays'
# slice along axis 0. The edp group holds the same experts and averages their gradients.

# %%
g = engine.experts
held = world.allgather_object((g.ep_group.ranks, g.edp_group.ranks, g.first, g.per_rank,
                               [f"{p.name}{list(p.data.shape)}" for p in engine.expert_params[:2]]))
for rank, (ep, edp, first, n, shapes) in enumerate(held):
    say(f"rank {rank}: ep group {list(ep)}, edp group {list(edp)}, experts {first}..{first + n - 1}, "
        f"e.g. {', '.join(shapes)}")

# %% [markdown]
# ## One step: the all-to-all counts and its bytes
#
# Each rank sorts its kept routing slots by expert; send[r] rows go to ep rank r.
# The counts are exchanged first (an all_to_all of E ints), then the rows (Alltoallv).

# %%
mark = world.ledger.snapshot()
engine.train_step(0, task, 16)
send, recv = engine.model.blocks[0].mlp.exchange
exchanged = world.allgather_object((send.tolist(), recv.tolist()))
matrix = [sent for sent, _ in exchanged]
say("layer 0 counts matrix: rows each dp rank sends to ep rank 0, 1 of its group (itself included)")
for d, row in enumerate(matrix):
    say(f"  rank {d}: {row}   ep group {list(held[d][0])}")
record = engine.expert_log[-1]
step = world.ledger.since(mark)
say(f"rank 0 all_to_all_v bytes: ledger {step.total_bytes(op='all_to_all_v')}, "
    f"formula 2 (sent + received) C 8 over 2 layers = {record['formula_bytes']}")
say(f"global tokens per expert, layer 0: {record['layers'][0]['tokens']}")

# %% [markdown]
# ## Parity: the sharded run equals the serial mixture of experts
#
# `lockstep` (minipar/lockstep.py) trains a fresh expert-parallel run and its serial
# oracle (the same global micro-batches, `Layout(serial_of_dp=4)`) side by side, and
# compares every parameter, gradient and Adam moment after every step.

# %%
run = lockstep(cfg, Layout(dp=4, ep=2), task, 16, steps=3, grid=grid, optim=optim)
(loss, serial_loss), err = run.losses[-1], run.worst
say(f"after 3 steps: loss {loss:.6f} vs serial {serial_loss:.6f}; max relative error {err:.2e}")
assert err < 1e-10
assert all(r["ledger_bytes"] == r["formula_bytes"] for r in engine.expert_log + run.local.expert_log)
assert sum(record["layers"][0]["tokens"]) == 16 * task.seq_len * cfg.top_k      # dropless
for d in range(4):                 # what d sends to ep rank j of its group is what that rank receives from d
    group = list(held[d][0])
    assert all(exchanged[group[j]][1][group.index(d)] == matrix[d][j] for j in range(2))
say("11_expert_parallel: all assertions passed")
