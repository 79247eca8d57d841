"""Lockstep: a sharded run and its serial oracle, stepped together and compared after every step.

Every parity test and every tutorial asks the same question: does this layout compute
what the serial run computes? They all answer it here, the same way:

    serial = Engine(cfg, serial_layout(cfg, layout))          the oracle, on one rank
    local  = Engine(cfg, layout, grid=grid)                   this rank's share of the run
    for step in range(steps):
        before_step(step, local, serial)                      (optional: the tests' hook)
        L_local, L_serial = local.train_step(...), serial.train_step(...)
        parity.check(group, compare_models(local, serial), tol, loss=(L_local, L_serial))

compare_models (minipar/parity.py) compares every gradient, the global gradient norm
(what clipping used), every parameter and Adam's m and v against the serial slice; the
check is one collective verdict over the grid's ranks. A mistake is named at the step
it happens, before its effects spread through the optimizer.
"""
from dataclasses import dataclass, fields

from minipar import parity
from minipar.engine import Engine, Layout


def serial_layout(cfg, layout):
    """The serial oracle of `layout`: one micro-batch. A mixture of experts routes (capacity,
    aux loss) per global micro-batch, so its oracle runs the same global micro-batches."""
    if cfg.experts:
        return Layout(micro_batches=layout.micro_batches, serial_of_dp=layout.dp)
    return Layout(micro_batches=1)


def describe(layout):
    """The fields of a Layout that differ from the defaults: "Layout(dp=2, zero=1)"."""
    default = Layout()
    changed = [f"{f.name}={getattr(layout, f.name)!r}" for f in fields(Layout)
               if getattr(layout, f.name) != getattr(default, f.name)]
    return f"Layout({', '.join(changed)})"


@dataclass
class Outcome:
    """What a lockstep run leaves for its caller to assert on."""
    errors: list          # per step, the worst relative error over every rank (the same on each)
    losses: list          # per step, (the sharded run's global mean loss, the serial run's)
    local: Engine         # this rank's engine of the sharded run
    serial: Engine        # the serial oracle

    @property
    def worst(self):
        return max(self.errors, default=0.0)


def lockstep(cfg, layout, task, batch, steps=2, *, grid=None, optim=None, seed=0, tol=None,
             before_step=None, device=None, tracer=None, engine=Engine):
    """Train the run of `layout` (on `grid`) and its serial oracle side by side for `steps`
    steps of global batch `batch`; after each, a collective parity verdict (ParityError on
    every rank of the grid at once when any quantity differs by more than `tol`, default
    parity.TOLERANCE of the config's precision).

    before_step(step, local, serial), if given, runs before each step on both engines (a
    test alters them alike: scaled weights, a tied router). `tracer` records the local run's
    pipeline actions (parallel/pipeline/trace.py); `engine` is the local run's class (a test's
    subclass of Engine). Returns an Outcome."""
    tol = parity.TOLERANCE[cfg.precision] if tol is None else tol
    serial = Engine(cfg, serial_layout(cfg, layout), optim, seed, device=device)
    local = engine(cfg, layout, optim, seed, grid, tracer, device=device)
    group = grid.world if grid is not None else None
    algorithm = f", {group.algorithm}" if group is not None else ""
    errors, losses = [], []
    for step in range(steps):
        if before_step is not None:
            before_step(step, local, serial)
        want = serial.train_step(step, task, batch)
        got = local.train_step(step, task, batch)
        rows = parity.compare_models(local, serial)    # under ZeRO: gathers the shards (collective over dp)
        where = f" ({describe(layout)}, {cfg.precision}{algorithm}, batch {batch}) at step {step}"
        errors.append(parity.check(group, rows, tol, where, loss=(got, want)))
        losses.append((got, want))
    return Outcome(errors, losses, local, serial)
