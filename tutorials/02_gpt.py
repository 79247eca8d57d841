# python tutorials/02_gpt.py
# %% [markdown]
# # 02 · A GPT, shape by shape, trained on one CPU core
#
# `minipar/nn.py` is a nanoGPT-shaped model (Radford et al. 2019) built on the
# autograd of tutorial 01. This tutorial
#
# 1. configures a small GPT with `GPTConfig`;
# 2. looks at the built-in task: reverse a string of digits;
# 3. follows one batch through the model, every shape written next to the line;
# 4. trains it with `Engine`, the one-device run that every parallel layout
#    must reproduce exactly, and measures accuracy before and after.
#
# Letters: B batch, T sequence, C model width, H heads, D = C/H head size, V vocabulary.

# %%
import time

import numpy as np

from minipar import ops
from minipar.autograd import no_grad
from minipar.data import ReverseTask
from minipar.engine import Engine, OptimConfig
from minipar.nn import GPT, GPTConfig

# %% [markdown]
# ## 1. The configuration
#
# A dataclass with one comment per field (see `GPTConfig` in nn.py). It checks
# itself: `d_model` must divide into `n_head` heads, dropout must be in [0, 1),
# and so on, so a bad configuration fails here rather than deep in a matmul.

# %%
task = ReverseTask(n_digits=6, seed=0)
cfg = GPTConfig(
    vocab_size=task.vocab_size,    # V = 11: the digits 0-9 and a separator
    seq_len=task.seq_len,          # T = 12: 6 prompt digits, separator, 5 answer digits
    n_layer=2,                     # L transformer blocks
    n_head=4,                      # H heads of D = 32 / 4 = 8
    d_model=32,                    # C
    tied_embeddings=True,          # the output head reuses the token embedding
)
try:
    GPTConfig(d_model=30, n_head=4)
except ValueError as err:
    print("rejected:", err)
model = GPT(cfg, seed=0)
for name, p in list(model.named_parameters())[:6]:
    print(f"{name:28s} {str(p.shape):10s}")
print("...", f"{model.num_params():,} parameters in all")

# %% [markdown]
# ## 2. The task
#
# A sample is 6 random digits, the separator (10), then the digits reversed.
# The model reads `x = tokens[:-1]` and predicts `y = tokens[1:]`, each position
# the next token. Only the answer is scored: targets over the prompt are -1,
# which the loss ignores. Guessing a digit is right 1 time in 10.

# %%
x, y = task.batch(step=0, indices=np.arange(4))                  # (B, T) each
print("x[0]:", x[0])
print("y[0]:", y[0])

# %% [markdown]
# ## 3. One batch through the model
#
# `GPT.forward` is `embed -> blocks -> head`. Here are the same steps by hand,
# with the module objects of the model, under `no_grad` (no graph is needed to
# look at shapes).

# %%
B, T, C, H, V = x.shape[0], cfg.seq_len, cfg.d_model, cfg.n_head, cfg.vocab_size
with no_grad():
    h = model.embed(x)                                           # (B, T, C) = wte[x] + wpe[0:T]
    shapes = {"embed": h.shape}
    block = model.blocks[0]
    a = block.ln_1(h)                                            # (B, T, C)
    qkv = block.attn.c_attn(a)                                   # (B, T, 3C): per head [q | k | v]
    att = ops.causal_attention(qkv, H)                           # (B, T, C): softmax(q k^T / sqrt(D)) v
    h = h + block.attn.c_proj(att)                               # (B, T, C): residual
    m = block.mlp.fc(block.ln_2(h))                              # (B, T, 4C)
    h = h + block.mlp.proj(ops.gelu(m))                          # (B, T, C): residual
    shapes.update(qkv=qkv.shape, attention=att.shape, mlp_hidden=m.shape, block=h.shape)
    for later in model.blocks[1:]:
        h = later(h)                                             # (B, T, C)
    logits = model.head(h)                                       # (B, T, V) = ln_f(h) wte^T
    shapes["logits"] = logits.shape
    same = np.allclose(logits.data, model(x).data, rtol=1e-12)
    loss = model.criterion(logits, y)                            # mean over the scored targets
for name, shape in shapes.items():
    print(f"{name:11s} {shape}")
print(f"by hand == model(x): {same};  initial loss {loss.item():.3f}  (ln V = {np.log(V):.3f})")

# %% [markdown]
# ## 4. Training with the Engine
#
# `Engine(cfg, layout, optim, seed)` builds the model from the seed and runs
# `train_step(step, task, global_batch)`: forward, backward, (for larger layouts:
# gradient sync), AdamW. With the default `Layout()` every parallel degree is 1:
# this is the serial oracle. `accuracy` is measured on the held-out split with
# teacher forcing: the fraction of answer digits predicted exactly.

# %%
engine = Engine(cfg, optim=OptimConfig(lr=1e-2), seed=0)
before = engine.accuracy(task, n_samples=256)
print(f"accuracy before training: {before:.3f}")
losses, start = [], time.perf_counter()
for step in range(300):
    losses.append(engine.train_step(step, task, global_batch=32))
    if step % 50 == 0 or step == 299:
        print(f"step {step:3d}  loss {losses[-1]:.4f}")
after = engine.accuracy(task, n_samples=256)
print(f"accuracy after training: {after:.3f}  ({time.perf_counter() - start:.1f} s)")

# %% [markdown]
# Greedy predictions for a few held-out prompts (teacher forcing: each answer
# position sees the correct digits before it):

# %%
vx, vy = task.batch(step=0, indices=np.arange(3), split="val")
pred = engine.predict(vx)                                        # (B, T) next-token ids
k = task.k
for row in range(3):
    print("prompt", vx[row, :k], " answer", vy[row, k:], " predicted", pred[row, k:])

# %% [markdown]
# ## Checks

# %%
assert shapes == {"embed": (B, T, C), "qkv": (B, T, 3 * C), "attention": (B, T, C),
                  "mlp_hidden": (B, T, 4 * C), "block": (B, T, C), "logits": (B, T, V)}
assert same and abs(loss.item() - np.log(V)) < 0.5                # near uniform at init
assert before < 0.25                                              # chance is 0.1
assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:20])
assert after > 0.9, after
print("all checks passed")
