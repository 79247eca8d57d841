# mpirun -n 4 python -m mpi4py tutorials/06_pipeline_parallel.py
# %% [markdown]
# # 06 · Pipeline parallelism: cut the model by layers, keep every stage busy
#
# Cut the L transformer blocks into p consecutive **stages**, one per rank.
# Rank 0 embeds the tokens and runs its blocks, sends the activation (b, T, C)
# to rank 1, ..., and rank p-1 computes the loss; gradients walk back the same
# way. Each rank holds only 1/p of the weights.
#
# Run naively, only one rank works at a time. So the batch is cut into m
# **micro-batches** that follow each other through the pipe. A **schedule** says
# in which order each rank runs the forwards (F) and backwards (B) of the
# micro-batches; whatever order, some time is idle, the **bubble**:
#
#     GPipe, 1F1B        (p-1) / (m+p-1)        Huang et al. 2019, Narayanan et al. 2019
#     interleaved (v)    (p-1) / (v·m+p-1)      each rank holds v thinner chunks (2021)
#     ZB-H1              (p-1) / (3m+p-1)       B split into input grad B + weight grad W (Qi et al. 2024)
#
# (in units of one action; m >= p for ZB-H1). Schedules differ in memory too:
# GPipe keeps all m micro-batches' activations before the first backward, 1F1B
# never more than p. Here we draw the four schedules, run them for real, and
# measure the bubble, the activation memory and the bytes sent.

# %%
from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.formulas import pp_comm_elements
from minipar.nn import GPTConfig
from minipar.parallel.pipeline import schedules
from minipar.parallel.pipeline.trace import Tracer, ascii_gantt

world = Group.world(ledger=CommLedger())
if world.size == 1:                             # one rank splits nothing: say so, do not crash
    raise SystemExit("this tutorial needs 4 ranks: mpirun -n 4 python -m mpi4py tutorials/06_pipeline_parallel.py")
P, r = world.size, world.rank
grid = ProcessGrid(world, 1, P, 1)              # pp = P: every rank is one pipeline stage
M, b = 2 * P, 2                                 # micro-batches per step, samples per micro-batch
RUNS = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1))   # (schedule, chunks per rank v)


def say(text=""):
    """Print once, on rank 0."""
    if r == 0:
        print(text, flush=True)


cfg = GPTConfig(vocab_size=11, seq_len=8, n_layer=2 * P, n_head=2, d_model=16, precision="fp64")
task = ReverseTask(n_digits=4)                  # 8 tokens per sample
optim = OptimConfig(lr=1e-2)

# %% [markdown]
# ## 1. Stages
#
# With v chunks per rank there are S = p·v virtual stages; chunk c of rank r is
# stage c·p + r, so a micro-batch visits the ranks v times round-robin. Blocks
# are split evenly, earlier stages taking the extra ones. The engine builds the
# full model from the seed on every rank, then `Pipeline` drops what the rank
# does not hold: the parameter counts add up to the serial model's (plus the
# tied embedding, which the last stage keeps a copy of for the head).

# %%
for schedule, v in (("1f1b", 1), ("interleaved", 2)):
    engine = Engine(cfg, Layout(pp=P, micro_batches=M, schedule=schedule, virtual_stages=v), optim, grid=grid)
    rows = world.allgather_object((repr(engine.pipeline.stages), sum(p.data.size for p in engine.params)))
    say(f"{schedule}, v = {v}:")
    for rank, (stages, n) in enumerate(rows):
        say(f"  rank {rank}: {n:>5} parameters  {stages}")
say(f"serial model: {engine.n_params} parameters; wte is {cfg.vocab_size * cfg.d_model} of them")

# %% [markdown]
# ## 2. Schedules are data
#
# `make_schedule(name, p, m, v)` returns, for each rank, the ordered list of
# actions F, B, W and the sends / receives around them. `simulate` replays the
# lists with one time unit per action (one chunk's action for interleaved), the
# Gantt shows the result: `.` is the bubble.

# %%
for schedule, v in RUNS:
    plan = schedules.make_schedule(schedule, P, M, v)
    events = schedules.simulate(plan, P, v)
    bubble = schedules.bubble_fraction(events, P)
    say(f"\n{schedule} (p={P}, m={M}, v={v}): bubble {bubble} = {float(bubble):.3f}")
    say(schedules.ascii_gantt(events, P))

# %% [markdown]
# ## 3. Run them, check them, time them
#
# One executor runs every schedule: it walks the rank's action list, receives
# activations (blocking), sends them on (non-blocking), and for ZB-H1 lets B
# queue each Linear's weight gradient as a closure that the W action runs.
# After each of two AdamW steps every run must equal the serial run. The tracer stamps
# every action; `trace_summary` re-simulates the actions that really ran with
# unit durations (logical bubble, which must equal the formula exactly) and
# measures the wall-time bubble. With tiny matrices, and 4 processes sharing
# the cores of a small machine, the wall time is dominated by Python, messages
# and the OS scheduler: the wall bubble says more about overhead than about
# the schedule, which is why the logical bubble is the one checked.

# %%
results = {}
for schedule, v in RUNS:
    layout = Layout(pp=P, micro_batches=M, schedule=schedule, virtual_stages=v)
    # the pipeline and the serial run stepped together (minipar/lockstep.py), parity checked every step
    run = lockstep(cfg, layout, task, M * b, steps=2, grid=grid, optim=optim, tracer=Tracer(grid.pp_rank))
    engine, err = run.local, run.worst
    report = engine.pipeline.trace_summary(M)
    ran = engine.pipeline.gather_executed()
    logical = schedules.bubble_fraction(schedules.simulate(ran, P, v), P)
    results[schedule] = dict(engine=engine, err=err, report=report, logical=logical,
                             formula=schedules.bubble_formula(schedule, P, M, v))
say(f"\n{'schedule':<12} {'max rel err':>11} {'logical':>9} {'formula':>9} {'wall bubble':>12} {'step ms':>8}")
for schedule, res in results.items():
    bub = res["report"]["bubble"]
    say(f"{schedule:<12} {res['err']:>11.1e} {str(res['logical']):>9} {str(res['formula']):>9} "
        f"{bub['measured']:>12.3f} {1e3 * res['report']['makespan_s']:>8.1f}")
zb_events = results["zb-h1"]["engine"].pipeline.gather_step_events()
say("\nZB-H1's second step as it really ran (wall time):")
say(ascii_gantt(zb_events, P, width=72))

# %% [markdown]
# ## 4. Activation memory
#
# Autograd reports every array a Function saves for backward to the engine's
# memory ledger, so the peak of saved activations is measured, not guessed.
# Divided by what one micro-batch's forward saves on the stage, it counts the
# micro-batches in flight: GPipe holds all M, 1F1B only p - r on rank r. ZB-H1
# holds 1F1B's full activations plus, for each B whose W has not run yet, the
# inputs of that micro-batch's matmuls (what dW = X^T dY still needs). Rank r
# lets at most r W's wait, so no rank holds more than p micro-batches' worth and
# the pipeline's peak, on rank 0, is 1F1B's.

# %%
peaks = {}
for schedule, res in results.items():
    pipe = res["engine"].pipeline
    per_mb = pipe.microbatch_activation_bytes(task, b)      # one F's saved bytes, per chunk
    peak = res["engine"].ledger.peak("activation")
    peaks[schedule] = world.allgather_object((peak, sum(per_mb) / len(per_mb)))
say(f"\n{'peak / one micro-batch':<24}" + "".join(f"{'rank ' + str(k):>9}" for k in range(P)))
for schedule, rows in peaks.items():
    say(f"{schedule:<24}" + "".join(f"{peak / f:>9.2f}" for peak, f in rows))
say("(interleaved: in units of one chunk's forward, half a stage's blocks, averaged over the rank's\n"
    " chunks; on the last rank one chunk also holds the head and the loss, so they differ)")

# %% [markdown]
# ## 5. Communication
#
# Each stage boundary carries one (b, T, C) activation forward and its gradient
# backward per micro-batch: b·T·C elements each way (v times as many boundaries
# with interleaving). The comm ledger counts what the sends really moved.

# %%
engine = Engine(cfg, Layout(pp=P, micro_batches=M, schedule="1f1b"), optim, grid=grid)
with world.ledger.measure() as calls:
    engine.train_step(0, task, M * b)
sent = world.sum_(calls.total_elements(group="pp", op="isend"))
unit = pp_comm_elements(b, task.seq_len, cfg.d_model, M)
say(f"\n1F1B step: {sent} elements sent over pp = 2 directions x {P - 1} boundaries x {unit} (= M·b·T·C)")

# %% [markdown]
# ## Checks

# %%
for schedule, res in results.items():
    agree(world, res["logical"] == res["formula"], f"{schedule}: logical bubble != formula")
agree(world, results["zb-h1"]["logical"] < results["1f1b"]["logical"], "ZB-H1 does not beat 1F1B")
agree(world, results["interleaved"]["logical"] < results["1f1b"]["logical"], "interleaving does not help")
gpipe_peak, gpipe_f = peaks["gpipe"][r]
ofob_peak, ofob_f = peaks["1f1b"][r]
agree(world, gpipe_peak == M * gpipe_f, f"GPipe peak {gpipe_peak} != M x {gpipe_f}")
agree(world, ofob_peak == (P - r) * ofob_f, f"1F1B peak {ofob_peak} != (p - r) x {ofob_f}")
agree(world, sent == 2 * (P - 1) * unit, f"sent {sent} != 2 (p-1) M b T C")
say("\nall checks passed")
