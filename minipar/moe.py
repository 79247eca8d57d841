"""Mixture of experts: the MLP becomes E expert MLPs and a linear router (Shazeer et al. 2017).

    x (N, C) -> router logits (N, E) -> p = softmax -> top-k experts per token -> gates
    y_t = sum over the k chosen experts e of  g_te * FFN_e(x_t)        FFN_e = proj_e(gelu(fc_e(x)))

Gating, the variant written down (GShard top-2 / Mixtral, Lepikhin et al. 2020, Jiang et al. 2024):
softmax over all E experts, keep the k largest probabilities, and renormalise them so
the k gates of a token sum to 1:  g_te = p_te / sum_{e' in topk(t)} p_te'. (This equals
Mixtral's softmax over the top-k logits. Switch's k = 1 without renormalising is not it:
with k = 1 the gate here is 1 and the router learns from the aux loss alone.)
Ties: top-k is a stable sort of -p, so equal probabilities go to the lower expert index.

Load balancing (Switch, Fedus et al. 2021, eq. 4-6), alpha = `aux_loss_coef`:

    L_aux = alpha * E * sum_i f_i * P_i     f_i = c_i / (N k)   fraction of the N k routing
                                                                slots given to expert i
                                            P_i = (1/N) sum_t p_ti   mean router probability
f_i is a count (no gradient); the counts c_i are those of the router's choice, before
any capacity dropping. N is the *global* batch of one forward: under data parallelism
the counts are gathered over the balance group (the dp ranks; `balance` below, None =
serial), so every rank uses the global f, and each rank's P is the mean over its own
tokens. Data-parallel gradient averaging then makes the mean over the ranks of
alpha E sum_i f_i P_i(local) exactly the serial alpha E sum_i f_i P_i(global), value
and gradient. (With M micro-batches per rank the statistics are those of the global
micro-batch, as in Megatron-LM; engine.Layout.serial_of_dp gives the serial oracle the
same micro-batches.) The loss a model returns is the cross-entropy; `WithAux` adds the
aux terms' gradient (their value is reported in `stats`).

Capacity (dropless by default): with `capacity_factor` cf each expert takes at most
    C = ceil(cf * N * k / E)
routing slots of the global batch, first come first served in global token order
(dp rank, token, then its k choices in order). A dropped slot contributes nothing; the
token keeps its residual, and its other gates are not renormalised again.

Dispatch keeps the expert order: the kept slots are sorted by (expert, slot), so each
expert's rows are contiguous and an expert-parallel all-to-all can send them as they are
(parallel/expert/).
"""
import math

import numpy as np

from minipar import ops
from minipar.autograd import Function
from minipar.backend import array_module, like, scatter_add_rows, to_device, to_host
from minipar.layers import Linear, Module, Parameter, normal


# ---- the Functions MoE needs: move rows, and one Linear per expert ----------------------------
class Gather(Function):
    """out = x[index] (rows); backward scatter-adds the rows back (a row taken twice adds twice).
    `index` is host routing metadata, moved explicitly to x's device."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.index, ctx.shape = like(index, x), x.shape
        return x[ctx.index]                                       # (len(index), C)

    @staticmethod
    def backward(ctx, g):
        dx = array_module(g).zeros(ctx.shape, dtype=g.dtype)
        scatter_add_rows(dx, ctx.index, g)                        # (S, C) rows into (N, C)
        return dx


class ScatterRows(Function):
    """out (n, C) with out[index[i]] += x[i]: the combine step; backward gathers."""

    @staticmethod
    def forward(ctx, x, index, n):
        ctx.index = index = like(index, x)
        out = array_module(x).zeros((n,) + x.shape[1:], dtype=x.dtype)
        scatter_add_rows(out, index, x)                           # (S, C) rows into (n, C)
        return out

    @staticmethod
    def backward(ctx, g):
        return g[ctx.index]                                       # (S, C)


class GroupedLinear(Function):
    """y = x_e W_e + b_e for consecutive row segments: segment e has counts[e] rows.

    W (E_local, C_in, C_out), b (E_local, C_out). A loop over the experts (a grouped GEMM):
    the experts' row counts differ, so one batched matmul does not fit."""

    @staticmethod
    def forward(ctx, x, w, b, counts):
        ctx.bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
        ctx.save_for_backward(x)
        ctx.keep_weight(1, w)
        out = array_module(x).empty((x.shape[0], w.shape[2]), dtype=x.dtype)   # (S, C_out)
        for e, (lo, hi) in enumerate(zip(ctx.bounds, ctx.bounds[1:])):
            out[lo:hi] = x[lo:hi] @ w[e].astype(x.dtype, copy=False) + b[e].astype(x.dtype, copy=False)
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved
        w = ctx.weight(1)
        xp = array_module(g)
        dx = xp.empty(x.shape, dtype=g.dtype)                     # (S, C_in)
        dw, db = xp.zeros(w.shape, dtype=g.dtype), xp.zeros((w.shape[0], w.shape[2]), dtype=g.dtype)
        for e, (lo, hi) in enumerate(zip(ctx.bounds, ctx.bounds[1:])):
            dx[lo:hi] = g[lo:hi] @ w[e].astype(g.dtype, copy=False).T
            dw[e] = x[lo:hi].T @ g[lo:hi]                          # (C_in, C_out)
            db[e] = g[lo:hi].sum(axis=0)
        return dx, dw.astype(w.dtype, copy=False), db.astype(w.dtype, copy=False)


class WithAux(Function):
    """The loss as it is (its value: the cross-entropy), with the aux loss's gradient added:
    backward hands the loss's seed to both, as d(loss + aux)/d(aux) = d(loss)/d(loss)."""

    @staticmethod
    def forward(ctx, loss, aux):
        ctx.xp, ctx.shape = array_module(aux), aux.shape
        return loss

    @staticmethod
    def backward(ctx, g):
        # the loss's seed may be a host scalar: moved explicitly to the aux loss's device, (1,)
        return g, to_device(g, ctx.xp).reshape(ctx.shape)


class AttachAux(Function):
    """A pipeline stage's output as it is, with its aux loss attached: backward seeds the aux
    with `seed` (= S/M, what the loss of this micro-batch is seeded with on the last stage)."""

    @staticmethod
    def forward(ctx, x, aux, seed):
        ctx.seed, ctx.dtype, ctx.shape = seed, aux.dtype, aux.shape
        return x

    @staticmethod
    def backward(ctx, g):
        return g, array_module(g).full(ctx.shape, ctx.seed, dtype=ctx.dtype)


def top_k(probs, k):
    """(N, k) expert indices of the k largest probabilities per row, largest first; ties go to
    the lower expert index (a stable sort of -p keeps equal entries in index order)."""
    return array_module(probs).argsort(-probs, axis=1, kind="stable")[:, :k]


def aux_of(blocks):
    """The sum of the aux losses of the MoE layers among `blocks` (last forward), or None."""
    terms = [b.mlp.aux for b in blocks if isinstance(b.mlp, MoE) and b.mlp.aux is not None]
    return None if not terms else sum(terms[1:], terms[0])


# ---- the layer -------------------------------------------------------------------------------
class MoE(Module):
    """E expert MLPs (C -> 4C -> C) and a router; replaces a Block's MLP (see GPTConfig).

    Expert weights are stacked along axis 0, so expert parallelism cuts that axis:
    w_fc (E, C, 4C)  b_fc (E, 4C)  w_proj (E, 4C, C)  b_proj (E, C)    router.weight (C, E).
    `experts` are those four (all E of them serially); E is the router's output width."""

    def __init__(self, router, experts, top_k, aux_loss_coef, capacity_factor):
        super().__init__()
        self.n_experts, self.k = router.weight.shape[1], top_k
        self.coef, self.capacity_factor = aux_loss_coef, capacity_factor
        self.router = router
        self.w_fc, self.b_fc, self.w_proj, self.b_proj = experts
        self.balance = None      # the Group whose tokens share routing statistics (None: serial)
        self.aux = None          # the aux loss Tensor of the last forward
        self.stats = None        # last forward: global tokens per expert, dropped slots, aux value
        self.log = []            # the stats of every training forward since the engine last read them

    @classmethod
    def from_config(cls, cfg, rng, dtype):
        """A freshly initialised layer of E = cfg.experts experts (the serial Block's MLP)."""
        c, e = cfg.d_model, cfg.experts
        router = Linear(c, e, rng, dtype, bias=False)
        w_fc = Parameter(normal(rng, (e, c, 4 * c), 0.02, dtype))
        w_proj = Parameter(normal(rng, (e, 4 * c, c), 0.02 / np.sqrt(2 * cfg.n_layer), dtype))
        experts = (w_fc, Parameter(np.zeros((e, 4 * c), dtype)), w_proj, Parameter(np.zeros((e, c), dtype)))
        return cls(router, experts, cfg.top_k, cfg.aux_loss_coef, cfg.capacity_factor)

    def expert_parameters(self):
        return [self.w_fc, self.b_fc, self.w_proj, self.b_proj]

    # -- statistics over the balance group -----------------------------------------------------
    def gather_counts(self, counts):
        """(R, E): every balance rank's routing counts, rank order (serial: R = 1)."""
        if self.balance is None or self.balance.size == 1:
            return counts[None]
        # all-gather over the balance (dp) group: E int64 routing counts per rank
        return self.balance.all_gather(counts[None]).reshape(self.balance.size, -1)   # (R, E)

    def capacity_mask(self, expert, by_rank):
        """(N*k,) bool: which slots fit their expert's capacity, first come first served in
        global order: the slots of lower balance ranks, then this rank's slots in order."""
        n_global = int(by_rank.sum()) // self.k
        cap = math.ceil(self.capacity_factor * n_global * self.k / self.n_experts)
        rank = 0 if self.balance is None else self.balance.rank
        offset = by_rank[:rank].sum(axis=0)                       # (E,) slots ahead of mine
        order = np.argsort(expert, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(expert, minlength=self.n_experts))])
        place = np.empty_like(expert)
        place[order] = np.arange(expert.size) - starts[expert[order]]   # my slot's place in its expert
        return offset[expert] + place < cap

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x):
        B, T, C = x.shape
        N, E, k = B * T, self.n_experts, self.k
        xf = x.reshape(N, C)                                      # (B*T, C)
        probs = ops.softmax(self.router(xf))                      # (N, E)
        choice = to_host(top_k(probs.data, k))                    # (N, k) on the host: routing is metadata
        flat = (np.arange(N)[:, None] * E + choice).reshape(-1)   # (N*k,) into probs.reshape(N*E)
        top = Gather.apply(probs.reshape(N * E, 1), flat).reshape(N, k)   # (N, k)
        gates = self.renormalise(top)                             # (N, k) rows sum to 1
        expert = choice.reshape(-1)                               # (N*k,) slot a = t*k + s
        by_rank = self.gather_counts(np.bincount(expert, minlength=E).astype(np.int64))  # (R, E)
        counts = by_rank.sum(axis=0)                              # (E,) global routing counts
        kept = np.ones(N * k, bool) if self.capacity_factor is None else self.capacity_mask(expert, by_rank)
        f = counts / (by_rank.sum() if by_rank.sum() else 1)      # f_i = c_i / (N_global k)
        # alpha E sum_i f_i P_i(local), shape (1,): it stays on the device (a 0-d sum may not)
        self.aux = (probs.mean(axis=0) * like(self.coef * E * f, probs.data)).sum(axis=0, keepdims=True)
        slots = np.flatnonzero(kept)
        slots = slots[np.argsort(expert[slots], kind="stable")]   # kept slots by (expert, slot)
        token = slots // k
        rows = Gather.apply(xf, token)                            # (S, C) expert-major
        per_expert = np.bincount(expert[slots], minlength=E)      # (E,) rows each expert gets
        y = self.experts(rows, per_expert)                        # (S, C)
        g = Gather.apply(gates.reshape(N * k, 1), slots)          # (S, 1)
        out = ScatterRows.apply(y * g, token, N)                  # (N, C) sum over each token's slots
        dropped = 0 if self.capacity_factor is None else int(counts.sum()) - self.count_kept(kept)
        sent, received = self.exchanged_rows()
        self.stats = {"tokens": counts, "dropped": dropped, "aux": float(to_host(self.aux.data)[0]),
                      "sent_rows": sent, "received_rows": received}
        if self.training:
            self.log.append(self.stats)
        return out.reshape(B, T, C)                               # (N, C) -> (B, T, C)

    def renormalise(self, top):
        """g_te = p_te / sum_{e' in topk(t)} p_te': the k gates of a token sum to 1."""
        return top / top.sum(axis=1, keepdims=True)

    def count_kept(self, kept):
        """Kept slots over the balance group (serial: here)."""
        n = int(kept.sum())
        return n if self.balance is None or self.balance.size == 1 else self.balance.sum_(n)

    def exchanged_rows(self):
        """(rows sent to, rows received from) the other ranks by the last dispatch: serial (0, 0)."""
        return 0, 0

    def experts(self, rows, per_expert):
        """FFN_e of each expert's rows (S, C), rows grouped by expert; expert parallelism
        overrides this with all-to-all, local experts, all-to-all back."""
        return self.ffn(rows, per_expert)

    def ffn(self, rows, counts):
        h = ops.gelu(GroupedLinear.apply(rows, self.w_fc, self.b_fc, counts))      # (S, 4C)
        return GroupedLinear.apply(h, self.w_proj, self.b_proj, counts)              # (S, C)


def moe_counts(cfg):
    """(total, active) parameters of one MoE layer: all E experts vs the k a token uses."""
    c = cfg.d_model
    expert = 2 * c * 4 * c + 4 * c + c                            # fc, proj and their biases
    return cfg.experts * expert + c * cfg.experts, cfg.top_k * expert + c * cfg.experts
