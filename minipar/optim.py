"""Optimizers, gradient clipping and mixed-precision loss scaling.

The update rules are plain functions on arrays (`adamw_update`, `sgd_update`),
so the same arithmetic updates a whole parameter (serial, DP, TP, PP), a flat
ZeRO shard, or a host-side offloaded shard: identical numbers by construction.

Mixed precision (Micikevicius et al. 2018): parameters and gradients are fp16;
the optimizer keeps an fp32 master copy plus Adam's m and v (K = 12 bytes per
parameter); the loss is multiplied by a scale S before backward and gradients
divided by S before the update; a step whose gradients overflowed is skipped
and S halves ("dynamic loss scaling").
"""
import contextlib
import math

import numpy as np

from minipar.backend import array_module
from minipar.contracts import ModelOptimizer


ADAM_CHUNK = 1 << 16            # elements updated at a time: a chunk stays in cache for all passes


def adamw_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, scratch=None):
    """AdamW (Loshchilov & Hutter 2019), in place on arrays of any shape:

        m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
        p <- p - lr wd p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    In place, through one scratch array (`scratch`, at least ADAM_CHUNK elements or p's
    size, reused across steps when the caller keeps one; else allocated here), and chunk
    by chunk of ADAM_CHUNK elements when every array is contiguous: each chunk's dozen
    passes then run in cache. The arithmetic per element is the same either way.
    """
    xp = array_module(p)
    arrays = (p, g, m, v)
    if all(a.flags.c_contiguous for a in arrays) and p.size > ADAM_CHUNK:
        flat = [a.reshape(-1) for a in arrays]                      # (n,) views, no copies
        work = xp.empty(ADAM_CHUNK, p.dtype) if scratch is None else scratch.reshape(-1)[:ADAM_CHUNK]
        for start in range(0, p.size, ADAM_CHUNK):
            c = slice(start, start + ADAM_CHUNK)
            pc, gc, mc, vc = (a[c] for a in flat)
            _adamw_in_place(xp, pc, gc, mc, vc, work[:pc.size], step, lr, beta1, beta2, eps, weight_decay)
        return
    scratch = xp.empty_like(p) if scratch is None else scratch.reshape(-1)[:p.size].reshape(p.shape)
    _adamw_in_place(xp, p, g, m, v, scratch, step, lr, beta1, beta2, eps, weight_decay)


def _adamw_in_place(xp, p, g, m, v, scratch, step, lr, beta1, beta2, eps, weight_decay):
    """adamw_update's passes on arrays of one shape, `scratch` the only temporary."""
    if weight_decay:
        xp.multiply(p, lr * weight_decay, out=scratch)
        p -= scratch                               # p - lr wd p (p is not read again before the step)
    m *= beta1
    xp.multiply(g, 1 - beta1, out=scratch)
    m += scratch
    v *= beta2
    xp.multiply(g, g, out=scratch)
    scratch *= 1 - beta2
    v += scratch
    # scratch <- sqrt(v / (1 - b2^t)) + eps, then the step m_hat / scratch
    xp.divide(v, 1 - beta2 ** step, out=scratch)
    xp.sqrt(scratch, out=scratch)
    scratch += eps
    xp.divide(m, scratch, out=scratch)
    scratch *= lr / (1 - beta1 ** step)
    p -= scratch


def sgd_update(p, g, buf, lr, momentum, weight_decay):
    """SGD with momentum: buf <- mu buf + g + wd p;  p <- p - lr buf."""
    if weight_decay:
        g = g + weight_decay * p
    if buf is None:
        p -= lr * g
        return
    buf *= momentum
    buf += g
    p -= lr * buf


class Optimizer(ModelOptimizer):
    """Holds per-parameter state; `master` is the array the update is applied to:
    the parameter itself, or an fp32 master copy when parameters are fp16.
    The ModelOptimizer of every layout without ZeRO (contracts.py)."""

    def __init__(self, params, master_dtype=None):
        self.params = list(params)
        self.master_dtype = master_dtype
        self.master = [p.data.astype(master_dtype) if master_dtype else p.data for p in self.params]
        self.t = 0

    def step(self, grad_scale=1.0):
        """One update with every gradient multiplied by `grad_scale` (1/S times the clip factor)."""
        self.t += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.astype(self.master[i].dtype, copy=False)    # no copy when dtypes match
            if grad_scale != 1.0:
                g = g * grad_scale
            self.update(i, self.master[i], g)
            if self.master[i] is not p.data:
                p.data[...] = self.master[i]          # fp32 master -> fp16 parameter

    def update(self, i, p, g):
        raise NotImplementedError

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def grad_stats(self):
        return grad_stats(self.params)

    def gathered(self):
        return contextlib.nullcontext(self)            # whole parameters and gradients already

    def moments(self, i):
        """{"m", "v"} or {"momentum"}: parameter i's moment arrays, those that exist."""
        raise NotImplementedError

    def state(self):
        """Optimizer state by parameter name: {name: {"master", "m", "v" | "momentum"}}."""
        return {p.name: {"master": self.master[i], **self.moments(i)} for i, p in enumerate(self.params)}

    def load_state(self, state, t):
        for i, p in enumerate(self.params):
            s = state[p.name]
            p.data[...] = s["param"]
            if self.master[i] is not p.data:
                self.master[i][...] = s.get("master", s["param"])
            for kind, array in self.moments(i).items():
                array[...] = s[kind] if kind in s else 0
        self.t = t


class AdamW(Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, master_dtype=None):
        super().__init__(params, master_dtype)
        self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m = [array_module(w).zeros_like(w) for w in self.master]
        self.v = [array_module(w).zeros_like(w) for w in self.master]
        # one scratch buffer, as large as the largest parameter, shared by every update
        largest = max(self.master, key=lambda w: w.size, default=None)
        self.scratch = None if largest is None else array_module(largest).empty(largest.size, largest.dtype)

    def update(self, i, p, g):
        adamw_update(p, g, self.m[i], self.v[i], self.t, self.lr, self.beta1, self.beta2,
                     self.eps, self.weight_decay, self.scratch)

    def moments(self, i):
        return {"m": self.m[i], "v": self.v[i]}


class SGD(Optimizer):
    def __init__(self, params, lr=1e-2, momentum=0.0, weight_decay=0.0, master_dtype=None):
        super().__init__(params, master_dtype)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buf = [array_module(w).zeros_like(w) if momentum else None for w in self.master]

    def update(self, i, p, g):
        sgd_update(p, g, self.buf[i], self.lr, self.momentum, self.weight_decay)

    def moments(self, i):
        return {} if self.buf[i] is None else {"momentum": self.buf[i]}


class LossScaler:
    """Dynamic loss scale S: halve on overflow (and skip the step), double after
    `growth_interval` clean steps. A static scaler is growth_interval=inf."""

    def __init__(self, init_scale=2.0 ** 15, growth_interval=1000, factor=2.0):
        self.scale, self.growth_interval, self.factor = float(init_scale), growth_interval, factor
        self.clean_steps = 0

    def update(self, found_inf):
        if found_inf:
            self.scale /= self.factor
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale *= self.factor
                self.clean_steps = 0


GRAD_STATS_CHUNK = 1 << 16      # elements cast to float64 at a time by grad_stats


def sum_squares(g, buf=None):
    """sum of g_i^2 over a flat array g, accumulated in float64. A float64 g is one dot
    product g.g; a lower-precision one is cast to float64 a chunk at a time into `buf`
    (GRAD_STATS_CHUNK float64s; made here when None): no full-size copy, no g*g array."""
    xp = array_module(g)
    if g.dtype == np.float64:
        return float(xp.dot(g, g))
    if buf is None:
        buf = xp.empty(min(GRAD_STATS_CHUNK, g.size), dtype=np.float64)
    acc = 0.0
    for start in range(0, g.size, GRAD_STATS_CHUNK):
        piece = buf[:min(GRAD_STATS_CHUNK, g.size - start)]
        piece[...] = g[start:start + GRAD_STATS_CHUNK]                 # cast into float64
        acc = acc + xp.dot(piece, piece)                               # stays on the device
    return float(acc)


def grad_stats(params):
    """Local [sum of squared gradients, number of non-finite gradients], as float64.

    Parameters whose `spec.norm_owner` is False (a replica another rank also holds) are
    left out, so summing these stats over ranks counts every serial parameter once."""
    total, bad, buf = 0.0, 0.0, None
    for p in params:
        if p.grad is None or not p.spec.norm_owner:
            continue
        g = p.grad.reshape(-1)                                        # (n,)
        if buf is None and g.dtype != np.float64:
            buf = array_module(g).empty(GRAD_STATS_CHUNK, dtype=np.float64)
        sq = sum_squares(g, buf)
        total += sq
        bad += 0.0 if math.isfinite(sq) else 1.0
    return np.array([total, bad])


def prepare_step(params, max_norm=None, scaler=None, reduce_sum=None, stats=None):
    """Decide the gradient multiplier for this step, the same way on every rank.

    Global norm ||g|| = sqrt(sum over all ranks' squares) / S (unscaled); the
    clip factor is min(1, max_norm / (||g|| + 1e-6)) (Pascanu et al. 2013).
    `reduce_sum` sums the small stats vector over the model-parallel ranks.
    Returns (grad_scale or None if the step must be skipped, grad_norm).
    """
    stats = grad_stats(params) if stats is None else stats
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    loss_scale = scaler.scale if scaler is not None else 1.0
    found_inf = stats[1] > 0
    if scaler is not None:
        scaler.update(found_inf)
    if found_inf:
        return None, float("inf")
    norm = math.sqrt(stats[0]) / loss_scale
    clip = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
    return clip / loss_scale, norm
