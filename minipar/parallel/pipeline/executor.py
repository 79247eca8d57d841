"""Pipeline parallelism: one executor that runs any schedule on this rank's stages.

A schedule (schedules.py) is data: for each pipeline rank an ordered list of
Actions. The executor below follows this rank's list exactly:

    RECV_F  blocking recv of micro-batch mb's activation from the previous virtual stage;
            it becomes a leaf Tensor that requires grad (the stage's input)
    F       stage forward; the last stage also computes the loss  criterion(head(x), y)
    SEND_F  non-blocking isend of the stage output to the next virtual stage
    RECV_B  blocking recv of dL/d(output) from the next virtual stage
    B       backward from the output (last stage: from S * loss / M); with a W in the
            schedule (ZB-H1) only the input gradient is computed now and each Linear's
            dW = X^T dY is queued as a closure
    SEND_B  non-blocking isend of the input leaf's .grad to the previous virtual stage
    W       run the queued weight-gradient closures of (mb, chunk)

Every message has a tag that encodes (micro-batch, stage boundary, direction), so
a receive can only ever match the message it is waiting for. Shapes are known in
advance: (b, T, C) per micro-batch, (b, T/tp, C) under sequence parallelism.

Why the 1/M: the loss of a step is the mean of the M micro-batch means, so each
backward starts from d(S * loss_mb / M) = S/M (S the loss scale), exactly as the
serial engine's gradient accumulation does. Gradients of different micro-batches
are accumulated interleaved, so the data-parallel sync is held off
(`sync.set_last_micro_batch(False)`) until the engine calls sync.finish() after
the whole schedule.
"""
from dataclasses import dataclass, field

import numpy as np

from minipar.autograd import Tensor, no_grad, track_saved
from minipar.backend import array_module, to_device
from minipar.layout import check_message_tags, check_schedule, check_stages
from minipar.memory import MemoryLedger
from minipar.moe import AttachAux, WithAux, aux_of
from minipar.parallel.pipeline import schedules
from minipar.parallel.pipeline.stages import build_stages, is_tied, stage_owner
from minipar.parallel.pipeline.trace import Tracer, summary

FORWARD, BACKWARD = 0, 1   # message directions: activations go up, their gradients come down


def message_tag(mb, boundary, direction, n_stages):
    """Tag of micro-batch mb's message across `boundary` (between virtual stages
    boundary and boundary + 1) in `direction`: distinct for every (mb, boundary, direction)."""
    return 2 * (mb * n_stages + boundary) + direction


def loss_gradient(loss, loss_scale, m):
    """The seed of a micro-batch's backward: d(S * loss_mb / M) / d(loss_mb) = S / M."""
    return array_module(loss.data).asarray(loss_scale / m, dtype=loss.data.dtype)


@dataclass
class StepState:
    """What one forward_backward keeps between actions, keyed by (mb, chunk)."""
    step: int
    task: object
    micro: list                                   # sample indices of each micro-batch
    loss_scale: float
    split_weight_grads: bool                      # the schedule has W actions (ZB-H1)
    inputs: dict = field(default_factory=dict)    # received activation: leaf, requires grad
    outputs: dict = field(default_factory=dict)   # stage output (last stage: the loss)
    grads: dict = field(default_factory=dict)     # received dL/d(output)
    wgrads: dict = field(default_factory=dict)    # deferred dW closures, until W
    sends: list = field(default_factory=list)     # isend requests in flight
    loss_sum: float = 0.0


class Pipeline:
    """This rank's pipeline stages and the executor of the layout's schedule.

    Pipeline(model, grid, layout, seed, tracer) narrows `model` (the full serial
    GPT, or its tensor-parallel shard) to pipeline rank grid.pp_rank's v chunks.
    A tracer should be Tracer(grid.pp_rank): its events are per pipeline rank."""

    def __init__(self, model, grid, layout, seed=0, tracer=None):
        self.model, self.grid, self.seed, self.tracer = model, grid, seed, tracer
        self.pp, self.p, self.rank = grid.pp_group, grid.pp, grid.pp_rank
        self.v, self.schedule = layout.virtual_stages, layout.schedule
        self.sequence_parallel = layout.sequence_parallel   # activations cut along T over tp
        self.n_stages = self.p * self.v
        check_schedule(self.schedule, self.p, layout.micro_batches, self.v)   # layout.py, before any collective
        check_stages(len(model.blocks), self.p, self.v)
        self.stages = build_stages(model, self.p, self.v, self.rank)
        self.holds_last = self.stages[-1].is_last
        self.tied = is_tied(model) and self.p > 1 and (self.stages[0].is_first or self.holds_last)
        if self.tied and self.holds_last:
            model.wte.weight.spec.norm_owner = False   # the first stage's copy counts in the grad norm
        self.compute_dtype = model.precision.compute_dtype          # dtype of activations
        self.executed = []                        # this rank's actions of the last step, as run
        self._trace_mark = 0

    @property
    def xp(self):
        """numpy, cupy or minipar.strict: wherever this stage's parameters live."""
        return array_module(self.parameters()[0].data)

    def parameters(self):
        """This rank's parameters (the model was narrowed to its stages)."""
        return self.model.parameters()

    def activation_shape(self, b, seq_len):
        """(b, T, C) of one micro-batch's message; T/tp under sequence parallelism, T/cp under cp."""
        tp = self.grid.tp if self.sequence_parallel else 1
        return (b, seq_len // (tp * self.grid.cp), self.model.cfg.d_model)   # (b, T/(cp tp), C) local

    # ---- one training step ---------------------------------------------------------------
    def forward_backward(self, step, task, micro_indices, loss_scale=1.0, sync=None):
        """Run this rank's schedule over the micro-batches; gradients accumulate in the
        parameters. Returns the mean loss over micro-batches on the last stage, else 0.0."""
        m = len(micro_indices)
        check_message_tags(self.p, m, self.v)     # layout.py: every message_tag below RING_TAG
        plan = schedules.make_schedule(self.schedule, self.p, m, self.v)[self.rank]
        run = StepState(step, task, list(micro_indices), loss_scale,
                        split_weight_grads=any(a.op == "W" for a in plan))
        self.executed = []
        if self.tracer is not None:
            self._trace_mark = len(self.tracer.events)
        if sync is not None:
            sync.set_last_micro_batch(False)      # micro-batches interleave: sync once, after
        for action in plan:
            self._run(run, action)
            self.executed.append(action)
        for request in run.sends:
            request.wait()
        left = {name: sorted(getattr(run, name)) for name in ("inputs", "outputs", "grads", "wgrads")
                if getattr(run, name)}
        if left:
            raise RuntimeError(f"pipeline rank {self.rank}: the {self.schedule!r} schedule left work "
                               f"undone (keys (mb, chunk)): {left}")
        return run.loss_sum / m if self.holds_last else 0.0

    def _run(self, run, action):
        handler = {"RECV_F": self._recv_forward, "F": self._forward, "SEND_F": self._send_forward,
                   "RECV_B": self._recv_backward, "B": self._backward, "SEND_B": self._send_backward,
                   "W": self._weight}[action.op]
        if self.tracer is None:
            handler(run, action)
            return
        with self.tracer.span(action.op, action.mb, action.chunk):
            handler(run, action)

    def _peer(self, action):
        """pp-group rank at the other end of a SEND / RECV action."""
        return schedules.peer(action, self.rank, self.p)[0]

    def _tag(self, action):
        s = self.stages[action.chunk].index
        boundary = s if action.op in ("SEND_F", "RECV_B") else s - 1
        direction = FORWARD if action.op.endswith("_F") else BACKWARD
        return message_tag(action.mb, boundary, direction, self.n_stages)

    def _receive(self, run, action):
        """A fresh buffer holding the (b, T, C) message that `action` waits for."""
        shape = self.activation_shape(len(run.micro[action.mb]), run.task.seq_len)
        buf = self.xp.empty(shape, dtype=self.compute_dtype)
        # recv: one micro-batch's activation (or its gradient), b*T*C elements, over pp
        return self.pp.recv_(buf, source=self._peer(action), tag=self._tag(action))

    def _send(self, run, action, array):
        run.sends = [r for r in run.sends if not r.test()]   # forget completed sends
        # isend: one micro-batch's activation (or its gradient), b*T*C elements, over pp
        run.sends.append(self.pp.isend(array, dest=self._peer(action), tag=self._tag(action)))

    def _recv_forward(self, run, a):
        run.inputs[a.mb, a.chunk] = Tensor(self._receive(run, a), requires_grad=True)

    def _forward(self, run, a):
        stage, samples = self.stages[a.chunk], run.micro[a.mb]
        key = self.model.dropout_key(self.seed, run.step, samples)
        x = y = None
        if stage.is_first or stage.is_last:
            x, y = run.task.batch(run.step, samples)              # (b, T) ids and targets
        if not stage.is_first:
            x = run.inputs[a.mb, a.chunk]                         # (b, T, C), received
        out = stage(x, key, y if stage.is_last else None)
        aux = aux_of(stage.blocks)                # MoE: this stage's load-balancing loss joins backward
        if aux is not None:
            out = WithAux.apply(out, aux) if stage.is_last else \
                AttachAux.apply(out, aux, seed=run.loss_scale / len(run.micro))
        if stage.is_last:
            run.loss_sum += out.item()
        run.outputs[a.mb, a.chunk] = out

    def _send_forward(self, run, a):
        self._send(run, a, run.outputs[a.mb, a.chunk].data)

    def _recv_backward(self, run, a):
        run.grads[a.mb, a.chunk] = self._receive(run, a)

    def _backward(self, run, a):
        out = run.outputs.pop((a.mb, a.chunk))    # dropping it frees the graph after backward
        if self.stages[a.chunk].is_last:
            seed = loss_gradient(out, run.loss_scale, len(run.micro))
        else:
            seed = run.grads.pop((a.mb, a.chunk))
        queue = run.wgrads.setdefault((a.mb, a.chunk), []) if run.split_weight_grads else None
        out.backward(seed, wgrad_queue=queue)

    def _send_backward(self, run, a):
        x = run.inputs.pop((a.mb, a.chunk))
        self._send(run, a, x.grad)                # dL/dx, the input leaf's gradient

    def _weight(self, run, a):
        for work in run.wgrads.pop((a.mb, a.chunk)):
            work()                                # dW = X^T dY (and db) into the parameters

    # ---- after the step ------------------------------------------------------------------
    def sync_tied_grads(self):
        """Tied embeddings: the first stage's wte and the last stage's copy each hold part of
        dL/dwte (embedding rows, head matmul); both need the sum."""
        if not self.tied:
            return
        w = self.model.wte.weight
        if w.grad is None:
            raise RuntimeError("sync_tied_grads: wte has no gradient; call it after backward and "
                               "before a ZeRO reduce-scatter (sync.finish()) takes the gradients away")
        # all-reduce (sum) of dL/dwte, V*C elements (V/tp*C under TP), over embed {first, last}
        self.grid.embed.all_reduce_(w.grad, op="sum")

    def broadcast_loss(self, value):
        """The last stage's mean loss on every rank of this pipeline."""
        buf = np.array([value], dtype=np.float64)
        # broadcast: 1 float64 from the last stage to every rank of the pp group
        self.pp.broadcast_(buf, root=self.p - 1)
        return float(buf[0])

    def predict(self, x):
        """Greedy next-token ids (B, T) for inputs x, on every rank: one forward through
        the stages in order (no micro-batching), then a broadcast from the last stage."""
        h, sends = None, []
        with no_grad():
            for s in range(self.n_stages):
                rank, chunk = stage_owner(s, self.p)
                if rank != self.rank:
                    continue
                if s > 0:
                    buf = self.xp.empty(self.activation_shape(*x.shape), self.compute_dtype)
                    tag = message_tag(0, s - 1, FORWARD, self.n_stages)
                    # recv: the whole batch's activation, B*T*C elements, from stage s-1 over pp
                    h = Tensor(self.pp.recv_(buf, source=stage_owner(s - 1, self.p)[0], tag=tag))
                h = self.stages[chunk](x if s == 0 else h)
                if s < self.n_stages - 1:
                    tag = message_tag(0, s, FORWARD, self.n_stages)
                    # isend: the whole batch's activation, B*T*C elements, to stage s+1 over pp
                    sends.append(self.pp.isend(h.data, dest=stage_owner(s + 1, self.p)[0], tag=tag))
        for request in sends:
            request.wait()
        pred = self.model.predict(h) if self.holds_last else self.xp.empty(x.shape, np.int64)
        pred = pred.astype(np.int64, copy=False)                      # (B, T), on the device
        # broadcast: the (B, T) predicted ids, B*T int64, from the last stage over pp
        return self.pp.broadcast_(pred, root=self.p - 1)

    def microbatch_activation_bytes(self, task, b):
        """Saved-activation bytes of one micro-batch of b samples, per chunk of this rank: one
        F counted by a scratch ledger (its graph is then dropped, nothing is accumulated)."""
        samples, sizes = np.arange(b), []
        x, y = (to_device(a, self.xp) for a in task.batch(0, samples))   # (b, T) ids and targets
        for stage in self.stages:
            if not stage.is_first:                                    # (b, T, C) stand-in input
                x = Tensor(self.xp.zeros(self.activation_shape(b, task.seq_len), self.compute_dtype),
                           requires_grad=True)
            with track_saved(MemoryLedger(self.rank)) as ledger:
                stage(x, self.model.dropout_key(self.seed, 0, samples), y if stage.is_last else None)
            sizes.append(ledger.current("activation"))
        return sizes

    # ---- what ran -------------------------------------------------------------------------
    def gather_executed(self):
        """Every pipeline rank's executed action list of the last step (collective over pp)."""
        # allgather (pickled objects) over pp: each rank's list of Actions, a few per micro-batch
        return self.pp.allgather_object(self.executed)

    def gather_step_events(self):
        """Every pipeline rank's traced events of the last step on one clock (collective over pp)."""
        step = Tracer(self.rank)
        step.t0, step.events = self.tracer.t0, self.tracer.events[self._trace_mark:]
        return step.gather(self.pp)

    def trace_summary(self, m):
        """trace.summary of the last step (collective over pp): the wall-time bubble of what
        ran, the logical bubble of the executed actions replayed with unit durations, and the
        formula. Needs a tracer."""
        events = self.gather_step_events()
        return summary(events, self.p, self.schedule, m, self.v, self.gather_executed())
