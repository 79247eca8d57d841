"""One training step for any layout: the place where the strategies compose.

    full GPT (from the seed, identical on every rank)
      -> tensor-parallel shard (tp > 1)          parallel/tensor/megatron.py
      -> this rank's sequence chunks (cp > 1)     parallel/context/model.py
      -> this rank's pipeline stage (pp > 1)      parallel/pipeline/executor.py
      -> gradient sync over dp x cp: DDP buckets or ZeRO shards
      -> optimizer (AdamW / SGD; master weights + loss scaling under `mixed`)

With every degree 1 the engine *is* the serial run, the oracle all parity
checks compare against. The global batch is fixed: data-parallel rank d takes
samples [d*B/dp, (d+1)*B/dp), which are then cut into equal micro-batches.
The cp ranks of one dp rank take the same samples and each its chunks of their
tokens; gradients are averaged over dp x cp (grid.dp_cp_group).
"""
from dataclasses import dataclass

import numpy as np

from minipar import autograd
from minipar.backend import array_module, device_module, to_device, to_host
from minipar.contracts import LocalGrads
from minipar.comm.ledger import CommLedger
from minipar.layout import Layout, check_batch, validate  # noqa: F401  (Layout: engine.Layout too)
from minipar.memory import MemoryLedger
from minipar.nn import GPT
from minipar.optim import SGD, AdamW, LossScaler, prepare_step
from minipar.parallel.context.model import shard_context_parallel
from minipar.parallel.data.ddp import DataParallel
from minipar.parallel.expert.dispatch import shard_experts
from minipar.parallel.expert.groups import ExpertGroups
from minipar.parallel.expert.stats import drain, step_record
from minipar.parallel.expert.sync import ExpertDataParallel, ExpertZero
from minipar.parallel.pipeline.executor import Pipeline
from minipar.parallel.tensor.megatron import shard_tensor_parallel
from minipar.parallel.zero.stages import make_zero


@dataclass
class OptimConfig:
    name: str = "adamw"            # adamw | sgd
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0          # sgd only
    max_norm: float = None         # global gradient-norm clip; None = off
    init_loss_scale: float = 2.0 ** 15


def make_optimizer(params, cfg, precision):
    master = precision.master_dtype if precision.has_master else None
    if cfg.name == "adamw":
        return AdamW(params, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay, master)
    if cfg.name == "sgd":
        return SGD(params, cfg.lr, cfg.momentum, cfg.weight_decay, master)
    raise ValueError(f"unknown optimizer {cfg.name!r}: expected adamw or sgd")


class OnDevice:
    """A task whose batches arrive on the engine's device: the one explicit host -> device move of data."""

    def __init__(self, task, xp, count=None):
        self.task, self.xp, self.count = task, xp, count
        self.seq_len, self.vocab_size = task.seq_len, task.vocab_size    # the task's own

    def batch(self, step, indices, split="train"):
        x, y = self.task.batch(step, indices, split)                 # (b, T) ids, targets on the host
        return to_device(x, self.xp, self.count), to_device(y, self.xp, self.count)


class Engine:
    """Builds this rank's share of the model and runs training steps on it.

    Strategy plug-in points (each strategy file provides one function/class):
      tp > 1         model = shard_tensor_parallel(model, grid.tp_group, sequence_parallel)
      cp > 1         model = shard_context_parallel(model, grid.cp_group, cp_algo, cp_split, ...)
      pp > 1         self.pipeline = Pipeline(model, grid, layout, ...) runs forward/backward
      zero or offload  self.optimizer = self.sync = make_zero(...) (a Zero0-3), both contracts
      else           self.sync = DataParallel(...) (dp > 1) or LocalGrads, and a plain optimizer

    `self.sync` is a contracts.GradientSync and `self.optimizer` a contracts.ModelOptimizer:
    the engine calls nothing else on them.
    """

    def __init__(self, cfg, layout=None, optim=None, seed=0, grid=None, tracer=None, device=None):
        self.cfg, self.layout, self.seed = cfg, layout or Layout(), seed
        self.device = device or "cpu"            # the array backend: cpu | strict | gpu
        self.xp = device_module(self.device)
        self.optim_cfg, self.grid = optim or OptimConfig(), grid
        self.grad_norm = None          # the global ||g|| of the last step (parity compares it)
        lay = self.layout
        if grid is None and lay.world_size > 1:
            raise ValueError("a layout with more than one rank needs a ProcessGrid")
        validate(cfg, lay, grid.world.size if grid is not None else 1)   # layout.py: every rule, no collective
        rank = grid.world.rank if grid is not None else 0
        self.ledger = MemoryLedger(rank)
        self.model = GPT(cfg, seed)              # the full serial model, built from the seed
        self.n_params = self.model.num_params()  # Phi
        self.precision = self.model.precision
        self.scaler = LossScaler(self.optim_cfg.init_loss_scale) if self.precision.needs_loss_scaling else None
        self.dp_group = self.data_parallel_group()   # dp x cp: the ranks that average gradients
        self.dp_rank = grid.dp_rank if grid is not None else 0
        # the logged loss is averaged over dp on a side ledger, so the run's ledger holds training traffic only
        self.metrics_group = None
        if grid is not None:
            self.metrics_group = self.dp_group.using(ledger=CommLedger(), name="metrics")
        self.experts = self.expert_params = None   # MoE: expert groups over dp and the expert params
        self.expert_log = []                       # MoE: one routing record per step (parallel/expert/stats.py)
        if cfg.experts and grid is not None:
            self.experts = ExpertGroups(grid.dp_group, lay.ep, cfg.experts, grid.tp_rank)
            self.model, self.expert_params = shard_experts(self.model, self.experts)
        if lay.tp > 1:
            self.model = shard_tensor_parallel(self.model, grid.tp_group, lay.sequence_parallel)
        if lay.cp > 1:
            self.model = shard_context_parallel(self.model, grid.cp_group, lay.cp_algo, lay.cp_split,
                                                self.xp, self.ledger.transfers)
        self.pipeline = None
        if lay.pp > 1:
            self.pipeline = Pipeline(self.model, grid, lay, seed=seed, tracer=tracer)
            self.params = self.pipeline.parameters()
        else:
            self.params = self.model.parameters()
        for p in self.params:                    # built and cut on the host, now moved to the device once
            p.data = to_device(p.data, self.xp, self.ledger.transfers)
        if lay.zero or lay.offload:
            if self.experts is not None:           # dense params sharded over dp, experts over edp
                self.optimizer = self.sync = ExpertZero(self.params, self.expert_params, self.experts, lay,
                                                        self.optim_cfg, self.precision, self.ledger, self.model)
            else:
                self.optimizer = self.sync = make_zero(self.params, self.dp_group, lay,
                                                       self.optim_cfg, self.precision, self.ledger, self.model)
        else:
            if self.experts is not None and self.dp_group.size > 1:
                self.sync = ExpertDataParallel(self.params, self.expert_params, self.experts,
                                               lay.bucket_bytes, lay.overlap and lay.pp == 1)
            elif self.dp_group is not None and self.dp_group.size > 1:
                self.sync = DataParallel(self.params, self.dp_group, lay.bucket_bytes, lay.overlap and lay.pp == 1)
            else:
                self.sync = LocalGrads(self.params)
            self.optimizer = make_optimizer(self.params, self.optim_cfg, self.precision)
            self._register_model_state()
        # who counts the gradient statistics (sum g^2, non-finite): the optimizer, except with
        # experts and no ZeRO, where the sync knows which entries are dense and which experts
        self.grad_owner = self.sync if self.experts is not None and lay.zero == 0 and not lay.offload \
            and self.dp_group.size > 1 else self.optimizer

    def data_parallel_group(self):
        """The ranks whose gradients are averaged (and ZeRO's shard group): dp x cp, since cp
        ranks hold other tokens of the same samples (Megatron folds cp into data parallelism)."""
        return self.grid.dp_cp_group if self.grid is not None else None

    def _register_model_state(self):
        """Tell the memory ledger about parameters, gradients and optimizer state."""
        for p in self.params:
            self.ledger.add(f"param:{p.name}", p.data, "param")
            self.ledger.add(f"grad:{p.name}", p.data.nbytes, "grad")
        state = self.optimizer.state()
        for p in self.params:
            s = state[p.name]
            if s["master"] is not p.data:
                self.ledger.add(f"master:{p.name}", s["master"], "master")
            for kind, cat in (("m", "optim_m"), ("v", "optim_v")):
                if kind in s:
                    self.ledger.add(f"{kind}:{p.name}", s[kind], cat)

    # ---- one step ---------------------------------------------------------------------
    def local_indices(self, global_batch):
        """The sample indices of this dp rank, cut into micro-batches."""
        check_batch(global_batch, self.layout)   # layout.py: dp x micro-batches equal parts
        if self.layout.serial_of_dp > 1:         # the global micro-batches of a dp=N run, in rank order
            parts = np.arange(global_batch).reshape(self.layout.serial_of_dp, self.layout.micro_batches, -1)
            return [parts[:, j].reshape(-1) for j in range(self.layout.micro_batches)]   # (N, M, b) -> (N*b,)
        per_rank = global_batch // self.layout.dp
        mine = np.arange(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        return np.split(mine, self.layout.micro_batches)

    def zero_grad(self):
        self.sync.zero_grad()

    def loss_scale(self):
        return self.scaler.scale if self.scaler is not None else 1.0

    def forward_backward(self, step, task, global_batch):
        """Accumulate gradients of the mean loss over this rank's micro-batches; returns that loss."""
        micro = self.local_indices(global_batch)
        task = OnDevice(task, self.xp, self.ledger.transfers)
        if self.pipeline is not None:
            return self.pipeline.forward_backward(step, task, micro, self.loss_scale(), self.sync)
        total = 0.0
        for i, idx in enumerate(micro):
            self.sync.set_last_micro_batch(i == len(micro) - 1)   # communicate on the last one only
            x, y = task.batch(step, idx)
            loss = self.model.loss(x, y, self.model.dropout_key(self.seed, step, idx))
            # d(S * loss / M): the 1/M makes the accumulated gradient the mean over micro-batches
            loss.backward(array_module(loss.data).asarray(self.loss_scale() / len(micro), dtype=loss.data.dtype))
            total += loss.item() / len(micro)
        return total

    def train_step(self, step, task, global_batch):
        """forward/backward, gradient sync, optimizer step. Returns the global mean loss."""
        self.model.train()
        self.zero_grad()
        comm = self.grid.world.ledger if self.grid is not None else CommLedger()
        if self.cfg.experts:                     # MoE: forget routing logged outside training steps
            drain(self.model.blocks)
        mark = comm.snapshot()
        with autograd.track_saved(self.ledger):
            loss = self.forward_backward(step, task, global_batch)
        if self.cfg.experts:                     # this step's routing counts and all-to-all bytes
            row_bytes = self.cfg.d_model * np.dtype(self.precision.compute_dtype).itemsize
            self.expert_log.append(step_record(self.model.blocks, comm.since(mark), row_bytes))
        if self.pipeline is not None:           # tied wte: sum first, ZeRO's reduce-scatter takes the grads
            self.pipeline.sync_tied_grads()
        self.sync.finish()
        grad_scale, self.grad_norm = prepare_step(self.params, self.optim_cfg.max_norm, self.scaler,
                                                  self.reduce_grad_stats, self.grad_owner.grad_stats())
        if grad_scale is not None:
            with autograd.no_grad():
                self.optimizer.step(grad_scale)
        return self.mean_loss(loss)

    def reduce_grad_stats(self, stats):
        """Sum the stats over every rank that owns distinct gradient entries: the model-parallel
        group, or the whole world when each dp rank owns a shard of the gradients (ZeRO)."""
        if self.grid is None:
            return stats
        group = self.grid.world if self.grad_owner.shards_gradients else self.grid.mp_group
        if group.size == 1:
            return stats
        # all-reduce (sum) of 2 floats over the model-parallel (or whole, for ZeRO) group
        return group.all_reduce(stats, op="sum")

    def mean_loss(self, value):
        """The global mean loss, the same on every rank (pipeline: computed on the last stage)."""
        if self.grid is None:
            return value
        if self.pipeline is not None:
            value = self.pipeline.broadcast_loss(value)
        if self.dp_group.size == 1:
            return value
        # all-reduce (avg) of one float over the dp x cp ranks (metrics ledger): the logged loss
        return float(self.metrics_group.all_reduce(np.array([value]), op="avg")[0])

    # ---- evaluation -----------------------------------------------------------------------
    def predict(self, x):
        """Greedy next-token ids for host inputs x (B, T), as a host array on every rank."""
        x = to_device(x, self.xp, self.ledger.transfers)    # host -> device, explicitly
        if self.pipeline is not None:
            pred = self.pipeline.predict(x)
        else:
            with autograd.no_grad():
                pred = self.model.predict(self.model(x))
        return to_host(pred, self.ledger.transfers)        # device -> host, explicitly

    def accuracy(self, task, n_samples=256, step=0):
        """Fraction of scored held-out targets predicted exactly (teacher forcing, greedy)."""
        self.model.eval()
        x, y = task.batch(step, np.arange(n_samples), split="val")
        pred = self.predict(x)
        self.model.train()
        scored = y != -1
        return float((pred == y)[scored].mean())

    # ---- views used by parity checks and reports ---------------------------------------------
    def inspect(self):
        """A context in which every local parameter and its averaged gradient are whole on this
        rank (ZeRO keeps shards: it gathers them, collectively, and releases them on exit)."""
        return self.optimizer.gathered()

    def named_state(self):
        """{serial name: (parameter, {"m", "v", "master"})} for what this rank holds."""
        state = self.optimizer.state()
        return {p.name: (p, state.get(p.name, {})) for p in self.params}

    # ---- checkpoints (minipar/checkpoint.py) ---------------------------------------------------
    def optimizer_step_count(self):
        return self.optimizer.t

    def load_state(self, state, t, loss_scale=None, clean_steps=None):
        """Set parameters and optimizer state from {name: {"param", "master", "m", "v" |
        "momentum"}} host arrays in the local parameters' shapes (ZeRO keeps its shard)."""
        on_device = {name: {k: to_device(v, self.xp, self.ledger.transfers)      # host -> device
                            for k, v in arrays.items()} for name, arrays in state.items()}
        self.optimizer.load_state(on_device, t)
        if self.scaler is not None and loss_scale is not None:
            self.scaler.scale, self.scaler.clean_steps = loss_scale, clean_steps
        if self.scaler is not None and loss_scale is not None:
            self.scaler.scale, self.scaler.clean_steps = loss_scale, clean_steps
