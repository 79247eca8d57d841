# mpirun -n 4 python -m mpi4py tutorials/05_tensor_parallel.py
# %% [markdown]
# # 05 · Tensor parallelism: one layer, split over t ranks
#
# Data parallelism (tutorial 04) copies the whole model to every rank. When one
# layer no longer fits, or is too slow, on one device, Megatron-LM (Shoeybi et
# al. 2019) splits *every weight matrix* over t ranks instead. The trick is in
# how the two matmuls of an MLP are cut:
#
#     Y = GELU(X A)      A split by columns:  rank t computes GELU(X A_t) on its own
#     Z = Y B            B split by rows:     rank t computes Y_t B_t, a partial sum
#                                             Z = Σ_t Y_t B_t  (one all-reduce)
#
# Two conjugate operators carry the communication, one at each end of the pair:
#
#     f: identity forward, all-reduce backward    (X enters: every rank needs all of X)
#     g: all-reduce forward, identity backward    (Z leaves: the partial sums are added)
#
# Attention is split the same way, by whole heads. `minipar/parallel/tensor/megatron.py`
# does all of it; this tutorial opens it up:
#
# 1. each rank's weight shapes;
# 2. f and g on numbers you can check by hand;
# 3. one whole layer against the serial layer;
# 4. the whole model trained in lockstep with the serial run, and what it sent;
# 5. memory: parameters per rank, and activations with and without sequence
#    parallelism (Korthikanti et al. 2022).

# %%
import numpy as np

from minipar.autograd import Tensor, track_saved
from minipar.data import ReverseTask
from minipar.comm.group import CommLedger, Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree, assert_close
from minipar.engine import Layout
from minipar.lockstep import lockstep
from minipar.formulas import tp_comm_elements
from minipar.memory import MemoryLedger
from minipar.nn import GPT, DropoutKey, GPTConfig
from minipar.parallel.tensor.megatron import CopyToTP, ReduceFromTP, shard_tensor_parallel

world = Group.world(ledger=CommLedger())
if world.size == 1:                             # one rank splits nothing: say so, do not crash
    raise SystemExit("this tutorial needs 4 ranks: mpirun -n 4 python -m mpi4py tutorials/05_tensor_parallel.py")
t, r = world.size, world.rank
grid = ProcessGrid(world, 1, 1, t)          # no dp, no pipeline: all ranks form one tp group
tp = grid.tp_group


def say(text=""):
    """Print once, on rank 0."""
    if r == 0:
        print(text, flush=True)


task = ReverseTask(n_digits=4)              # 8 tokens per sample, ids < 11
n_head = 4 if 4 % t == 0 else t             # whole heads per rank
cfg = GPTConfig(vocab_size=16, seq_len=8, n_layer=2, n_head=n_head, d_model=4 * n_head,
                dropout=0.1, precision="fp64")   # vocab 16: divisible by t

# %% [markdown]
# ## 1. Who holds what
#
# `shard_tensor_parallel` takes the full serial GPT (built from the seed, the same
# on every rank) and keeps this rank's slice of each weight. Every local
# parameter remembers, in `p.spec`, which slice of which serial array it is.
# Column-parallel weights (c_attn, fc, wte/lm_head along V) lose columns,
# row-parallel ones (c_proj, proj) lose rows; LayerNorms, wpe and the
# row-parallel biases are replicated.

# %%
model = shard_tensor_parallel(GPT(cfg, seed=0), tp, sequence_parallel=False)
names = ["wte.weight", "wpe.weight", "blocks.0.ln_1.weight", "blocks.0.attn.c_attn.weight",
         "blocks.0.attn.c_attn.bias", "blocks.0.attn.c_proj.weight", "blocks.0.attn.c_proj.bias",
         "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"]
params = dict(model.named_parameters())
shapes = tp.allgather_object([tuple(params[n].shape) for n in names])
say(f"{'parameter':30s} {'serial':>9s}  " + "  ".join(f"{'rank ' + str(q):>9s}" for q in range(t))
    + "  split along")
for i, name in enumerate(names):
    spec = params[name].spec
    axis = "replicated" if spec.axis is None else f"axis {spec.axis}"
    say(f"{name:30s} {str(spec.full_shape):>9s}  " + "  ".join(f"{str(s[i]):>9s}" for s in shapes)
        + f"  {axis}")
say(f"attention: {cfg.n_head} heads; this rank runs {model.blocks[0].attn.n_head}, "
    f"heads {model.blocks[0].attn.head_slice.start} to {model.blocks[0].attn.head_slice.stop - 1}")

# %% [markdown]
# ## 2. f and g, by hand
#
# Each rank holds x_r = r + 1 (a 2-vector). f leaves it alone going forward;
# backward, it sums the gradients of all ranks. g sums going forward and leaves
# the gradient alone going backward. The two are each other's transpose.

# %%
x = Tensor(np.full(2, r + 1.0), requires_grad=True)
y = CopyToTP.apply(x, group=tp)                 # f
y.backward(np.full(2, 10.0 * (r + 1)))          # each rank's upstream gradient differs
f_forward, f_backward = y.data.copy(), x.grad.copy()
x2 = Tensor(np.full(2, r + 1.0), requires_grad=True)
z = ReduceFromTP.apply(x2, group=tp)            # g
z.backward(np.full(2, 10.0 * (r + 1)))
g_forward, g_backward = z.data.copy(), x2.grad.copy()
total, grad_total = t * (t + 1) / 2, 10.0 * t * (t + 1) / 2
say(f"rank 0: f forward {f_forward} (its own x), f backward {f_backward} (sum over ranks = {grad_total})")
say(f"rank 0: g forward {g_forward} (sum = {total}), g backward {g_backward} (its own gradient)")

# %% [markdown]
# ## 3. One whole layer against the serial layer
#
# A transformer block has two such pairs: (c_attn, c_proj) around attention and
# (fc, proj) around GELU, so it makes 2 all-reduces forward (g) and 2 backward
# (f), each of b·s·h elements. We feed the serial block and this rank's block
# the same input and compare output and input gradient. With sequence
# parallelism the block takes and returns (B, T/t, C): f and g become an
# all-gather along T and a reduce-scatter along T, moving the same bytes. As in
# Megatron, c_attn and fc keep only the T/t chunk of their input for backward
# and all-gather it again there: two more all-gathers, 10 instead of 8 b·s·h.

# %%
rng = np.random.default_rng(0)
b, s, h = 2, cfg.seq_len, cfg.d_model
x_full, g_full = rng.standard_normal((b, s, h)), rng.standard_normal((b, s, h))
key = DropoutKey(seed=0, step=0, samples=np.arange(b))
serial_block = GPT(cfg, seed=0).blocks[0]
xs = Tensor(x_full, requires_grad=True)
ys = serial_block(xs, key)
ys.backward(g_full)
layer_errors = {}
for sp in (False, True):
    block = shard_tensor_parallel(GPT(cfg, seed=0), tp, sp).blocks[0]
    mine = slice(r * s // t, (r + 1) * s // t) if sp else slice(None)   # this rank's T rows under SP
    xl = Tensor(x_full[:, mine].copy(), requires_grad=True)            # (B, T/t or T, C)
    with tp.ledger.measure() as fwd:
        yl = block(xl, key)
    with tp.ledger.measure() as bwd:
        yl.backward(g_full[:, mine].copy())
    layer_errors[sp] = max(assert_close(tp, "block output", yl.data, ys.data[:, mine], 1e-12),
                           assert_close(tp, "d input", xl.grad, xs.grad[:, mine], 1e-12))
    big = [e for w in (fwd, bwd) for e in w.entries if e.elements == b * s * h]
    sent = sum(e.bytes for e in big) / 8
    say(f"\nsequence parallel {sp}: max rel error {layer_errors[sp]:.1e}")
    say("  forward : " + ", ".join(f"{e.op}({e.elements})" for e in fwd.entries))
    say("  backward: " + ", ".join(f"{e.op}({e.elements})" for e in bwd.entries))
    say(f"  b*s*h = {b * s * h}: {len(big)} calls sent {sent:g} elements per rank; "
        f"{10 if sp else 8} b s h (t-1)/t = {tp_comm_elements(b, s, h, t, sequence_parallel=sp):g}")
    agree(tp, sent == tp_comm_elements(b, s, h, t, sequence_parallel=sp),
          "the layer's traffic is not 8bsh(t-1)/t (10bsh(t-1)/t under SP)")

# %% [markdown]
# Under SP the small all-reduces in backward (2h and h elements) are the
# LayerNorm and row-parallel-bias gradients: those weights are replicated but
# each rank applied them to its own T/t rows only, so their gradients are
# partial sums that must be added over tp (f applied to the weight).
#
# ## 4. The whole model, trained next to the serial run
#
# The embedding is split along the vocabulary too (rank t holds ids
# [tV/t, (t+1)V/t); others give 0, then g adds them up), the logits come out as
# (B, T, V/t), and the loss never gathers them: the row max, the sum of exp and
# the target logit are each one small all-reduce. Two AdamW steps, then every
# parameter, gradient and Adam moment is compared with its slice of the serial
# run after every step (`lockstep`, minipar/lockstep.py: both runs stepped
# together, one collective parity verdict a step).

# %%
worst = {}
for sp in (False, True):
    with tp.ledger.measure() as steps:
        run = lockstep(cfg, Layout(tp=t, sequence_parallel=sp, micro_batches=2), task, 8, steps=2, grid=grid,
                       tol=1e-11)
    worst[sp], (got, want) = run.worst, run.losses[-1]
    say(f"\nsequence parallel {sp}: step 1 loss {got:.6f} (serial {want:.6f}), "
        f"worst relative error {worst[sp]:.1e}")
    say("tp traffic of 2 steps x 2 micro-batches:\n" + steps.format())
say(f"\ngreedy accuracy (argmax without gathering logits): {run.local.accuracy(task, 64):.3f}, "
    f"serial {run.serial.accuracy(task, 64):.3f}")

# %% [markdown]
# ## 5. Memory
#
# Parameters: the split matrices are divided by t, the replicated vectors are not.
# Activations: the bytes every Function saved for backward, measured by
# `autograd.track_saved` (peak over one forward + backward, per rank). TP
# divides what lives inside attention and the MLP; the LayerNorm inputs, the
# residual stream and its dropout masks stay full-size on every rank, unless
# sequence parallelism cuts them along T.

# %%
full = GPT(cfg, seed=0)
split = sum(p.data.size for p in model.parameters() if p.spec.axis is not None)
replicated = sum(p.data.size for p in model.parameters() if p.spec.axis is None)
say(f"\nparameters: serial {full.num_params()}, per rank {split + replicated} = "
    f"{split * t} split / {t} + {replicated} replicated")
agree(tp, split * t + replicated == full.num_params(), "split/replicated counts do not add up")

x, y = task.batch(0, np.arange(4))
key = DropoutKey(seed=0, step=0, samples=np.arange(4))
peaks = {}
for label, net in (("serial", GPT(cfg, seed=0)),
                   ("TP", shard_tensor_parallel(GPT(cfg, seed=0), tp, False)),
                   ("TP + SP", shard_tensor_parallel(GPT(cfg, seed=0), tp, True))):
    with track_saved(MemoryLedger(r)) as ledger:
        net.loss(x, y, key).backward()
    peaks[label] = ledger.peak("activation")
say("activation bytes per rank (peak): " + ", ".join(f"{k} {v}" for k, v in peaks.items()))

# %% [markdown]
# ## Checks
# Collective verdicts: every rank reaches the same answer, so none waits forever.

# %%
agree(tp, np.array_equal(f_forward, np.full(2, r + 1.0)) and np.array_equal(f_backward, np.full(2, grad_total)),
      "f: identity forward, all-reduce backward")
agree(tp, np.array_equal(g_forward, np.full(2, total)) and np.array_equal(g_backward, np.full(2, 10.0 * (r + 1))),
      "g: all-reduce forward, identity backward")
agree(tp, max(layer_errors.values()) < 1e-12, f"layer errors {layer_errors}")
agree(tp, max(worst.values()) < 1e-11, f"model errors {worst}")
agree(tp, t == 1 or peaks["TP + SP"] < peaks["TP"] < peaks["serial"], f"activation peaks {peaks}")
say("\nall checks passed")
