"""Pipeline parallelism: stages, the executor, and what it measurably does.

Serial part: the layer split rule, what a rank keeps, and p = 1 pipelines (every
schedule, chunks talking to themselves) against the serial run.
MPI part: property-based parity with the serial run over p, m, schedule, v, dp,
tied / untied and dropout; the bubble re-simulated from what ran equals the formula
exactly; saved-activation peaks equal what the executed schedule implies; the bytes
sent across each stage boundary are exactly b*s*h per micro-batch and direction.
"""
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipar.backend import to_device
from minipar import autograd, parity
from minipar.autograd import Tensor
from minipar.data import ReverseTask
from minipar.comm.group import Group
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.formulas import pp_comm_elements
from minipar.memory import MemoryLedger
from minipar.nn import GPT, DropoutKey, GPTConfig
from minipar.parallel.pipeline import schedules
from minipar.parallel.pipeline.executor import Pipeline
from minipar.parallel.pipeline.stages import build_stages, split_layers, stage_owner, virtual_stage
from minipar.parallel.pipeline.trace import Tracer

pytestmark = pytest.mark.pp
SEED, TASK, TOL = 3, ReverseTask(n_digits=4), parity.TOLERANCE["fp64"]
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)
SCHEDULE_RUNS = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1))


def config(n_layer, tied=True, dropout=0.0):
    return GPTConfig(vocab_size=11, seq_len=8, n_layer=n_layer, n_head=2, d_model=8,
                     tied_embeddings=tied, dropout=dropout, precision="fp64")


class OneRankPipelineEngine(Engine):
    """An Engine that runs the pipeline executor even with pp = 1 (the plain Engine builds a
    Pipeline only for pp > 1): one rank's chunks then send to and receive from themselves."""

    def __init__(self, cfg, layout, optim, seed, grid, tracer=None, device=None):
        super().__init__(cfg, layout, optim, seed, grid, tracer, device)
        if self.pipeline is None:
            self.pipeline = Pipeline(self.model, grid, layout, seed, tracer)


def pipeline_engine(grid, device, schedule, m, v=1, cfg=None, tracer=False):
    """An Engine over the dp x pp `grid` running `schedule` on m micro-batches (v chunks a rank)."""
    cfg = cfg or config(grid.pp * v)
    layout = Layout(dp=grid.dp, pp=grid.pp, micro_batches=m, schedule=schedule, virtual_stages=v)
    trace = Tracer(grid.pp_rank) if tracer else None
    return OneRankPipelineEngine(cfg, layout, OPTIM, SEED, grid, tracer=trace, device=device)


def assert_parity(grid, device, cfg, schedule, m, v, batch, steps=2):
    """lockstep (minipar/lockstep.py) of the pipeline and the serial oracle: collective verdicts
    on the loss, grads, params, Adam m and v every step; then the same greedy predictions.
    Returns the largest relative error seen."""
    layout = Layout(dp=grid.dp, pp=grid.pp, micro_batches=m, schedule=schedule, virtual_stages=v)
    run = lockstep(cfg, layout, TASK, batch, steps, grid=grid, optim=OPTIM, seed=SEED, tol=TOL, device=device,
                   engine=OneRankPipelineEngine)
    x = TASK.batch(0, np.arange(4), split="val")[0]
    run.local.model.eval(), run.serial.model.eval()
    agree(grid.world, np.array_equal(run.local.predict(x), run.serial.predict(x)), "predictions differ from serial")
    return run.worst


# ----------------------------------------------------------------------------- serial
@settings(max_examples=40)
@given(st.integers(1, 40), st.integers(1, 16))
def test_split_is_contiguous_and_earlier_stages_get_the_extra_layers(n_layer, n_stages):
    if n_layer < n_stages:
        with pytest.raises(ValueError, match="at least one block"):
            split_layers(n_layer, n_stages)
        return
    ranges = split_layers(n_layer, n_stages)
    sizes = [len(r) for r in ranges]
    assert [i for r in ranges for i in r] == list(range(n_layer))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
    assert split_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]


def test_chunk_c_of_rank_r_is_virtual_stage_c_p_plus_r():
    p, v = 4, 3
    stages = sorted(virtual_stage(r, c, p) for r in range(p) for c in range(v))
    assert stages == list(range(p * v))
    assert all(stage_owner(virtual_stage(r, c, p), p) == (r, c) for r in range(p) for c in range(v))


@pytest.mark.parametrize("tied", [True, False])
def test_each_rank_keeps_only_its_modules(tied):
    p, v, cfg = 2, 2, config(5, tied)
    names = {}
    for rank in range(p):
        model = GPT(cfg, SEED)
        stages = build_stages(model, p, v, rank)
        names[rank] = [name for name, _ in model.named_parameters()]
        held = [b.index for s in stages for b in s.blocks]
        assert [b.index for b in model.blocks] == held
        assert [s.index for s in stages] == [rank, p + rank]
    # 5 blocks over 4 virtual stages: 2 1 1 1; rank 0 holds stages 0 and 2, rank 1 stages 1 and 3
    assert [b for b in names[0] if b.startswith("blocks")][-1].startswith("blocks.2")
    assert {"wte.weight", "wpe.weight"} <= set(names[0]) and "ln_f.weight" not in names[0]
    assert "wpe.weight" not in names[1] and "ln_f.weight" in names[1]
    assert ("wte.weight" in names[1]) == tied and ("lm_head.weight" in names[1]) == (not tied)


def test_fewer_layers_than_virtual_stages_is_refused():
    grid = ProcessGrid(Group.single(), 1, 1, 1)
    with pytest.raises(ValueError, match=r"--n-layer 2 cannot fill 3 pipeline stages \(--pp 1 x --virtual-stages 3\)"):
        Pipeline(GPT(config(2), SEED), grid, Layout(schedule="interleaved", virtual_stages=3), SEED)


@settings(max_examples=10)
@given(st.sampled_from(SCHEDULE_RUNS), st.integers(1, 3), st.booleans(), st.sampled_from([0.0, 0.1]),
       st.integers(0, 1))
def test_single_rank_pipeline_equals_serial(device, run, m, tied, dropout, extra_layers):
    schedule, v = run
    v = v + extra_layers if schedule == "interleaved" else v   # interleaved: 2 or 3 chunks, self-messages
    cfg = config(v + extra_layers, tied, dropout)
    assert_parity(ProcessGrid(Group.single(), 1, 1, 1), device, cfg, schedule, m, v, batch=2 * m)


# ----------------------------------------------------------------------------- MPI
def layouts(world_size):
    """(dp, pp) pairs whose dp*pp ranks tile the job."""
    return [(dp, pp) for pp in (1, 2, 4, 8) for dp in (1, 2, 4, 8)
            if world_size % (dp * pp) == 0 and dp * pp > 1]


@pytest.mark.mpi
@settings(max_examples=15)
@given(data=st.data())
def test_parity_with_serial_for_any_schedule_and_grid(world, grid_of, device, data):
    dp, pp = data.draw(st.sampled_from(layouts(world.size)), label="(dp, pp)")
    schedule, v = data.draw(st.sampled_from(SCHEDULE_RUNS), label="schedule")
    if schedule == "interleaved":
        v = data.draw(st.integers(2, 3 if pp <= 2 else 2), label="v")
        m = pp * data.draw(st.integers(1, 2), label="m / p")
    else:
        m = data.draw(st.integers(1, 2 * pp), label="m")
    tied = data.draw(st.booleans(), label="tied")
    dropout = data.draw(st.sampled_from([0.0, 0.1]), label="dropout")
    cfg = config(pp * v + data.draw(st.integers(0, 2), label="extra layers"), tied, dropout)
    batch = dp * m * data.draw(st.integers(1, 2), label="b")
    assert_parity(grid_of(dp, pp), device, cfg, schedule, m, v, batch)


@pytest.mark.mpi
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
@pytest.mark.parametrize("p,m", [(3, 3), (3, 5), (4, 4)])
def test_deep_pipelines_equal_serial_with_m_at_least_p(pipeline_group, device, schedule, p, m):
    """p >= 3 has middle stages that receive both activations and gradients; with m >= p, 1F1B
    keeps up to p micro-batches in flight and ZB-H1 runs deferred W steps that still read the
    gradients received for earlier micro-batches (a reused receive buffer breaks exactly this)."""
    grid = ProcessGrid(pipeline_group(p), 1, p, 1)
    assert_parity(grid, device, config(p + 1), schedule, m, 1, batch=m)


def largest_pipeline(world):
    p = 4 if world.size >= 4 else 2
    if world.size % p:
        pytest.skip(f"needs a multiple of {p} ranks")
    return p


@pytest.mark.mpi
def test_bubble_of_what_ran_equals_the_formula_and_zb_h1_beats_1f1b(world, group_of, device):
    p = largest_pipeline(world)
    group, m, logical = group_of(p), 2 * p, {}
    for schedule, v in SCHEDULE_RUNS:
        engine = pipeline_engine(ProcessGrid(group, 1, p, 1), device, schedule, m, v, tracer=True)
        engine.train_step(0, TASK, m)
        ran = engine.pipeline.gather_executed()
        logical[schedule] = schedules.bubble_fraction(schedules.simulate(ran, p, v), p)
        report = engine.pipeline.trace_summary(m)
        formula = schedules.bubble_formula(schedule, p, m, v)
        agree(group, ran == schedules.make_schedule(schedule, p, m, v), f"{schedule}: ran other actions")
        agree(group, logical[schedule] == formula and isinstance(logical[schedule], Fraction),
              f"{schedule}: logical bubble {logical[schedule]} != formula {formula}")
        agree(group, 0.0 <= report["bubble"]["measured"] < 1.0 and report["makespan_s"] > 0,
              f"{schedule}: wall-time report {report}")
    agree(group, logical["zb-h1"] < logical["1f1b"] and logical["interleaved"] < logical["1f1b"],
          f"bubbles {logical}")


def one_microbatch_bytes(pipeline, chunk, b):
    """Saved-activation bytes of one micro-batch on one of this rank's chunks: right after its
    F (`f`), and after its B with deferred weight gradients (`w`, what waits for W)."""
    stage, ledger = pipeline.stages[chunk], MemoryLedger()
    x, y = (to_device(a, pipeline.xp) for a in TASK.batch(0, np.arange(b)))
    if not stage.is_first:
        x = Tensor(pipeline.xp.zeros(pipeline.activation_shape(b, TASK.seq_len)), requires_grad=True)
    with autograd.track_saved(ledger):
        out = stage(x, DropoutKey(SEED, 0, np.arange(b)), y if stage.is_last else None)
        f = ledger.current("activation")
        queue = []
        out.backward(pipeline.xp.ones_like(out.data), wgrad_queue=queue)
        w = ledger.current("activation")
        for work in queue:
            work()
    return f, w


def implied_peak(actions, f, w):
    """The activation peak a rank's action list implies: f[c] held from each F to its B, and,
    when the schedule splits W off, w[c] from that B to its W."""
    split, held, peak = any(a.op == "W" for a in actions), 0, 0
    for a in actions:
        held += {"F": f[a.chunk], "B": -f[a.chunk] + (w[a.chunk] if split else 0),
                 "W": -w[a.chunk]}.get(a.op, 0)
        peak = max(peak, held)
    return peak


@pytest.mark.mpi
def test_activation_peaks_follow_the_schedule(world, group_of, device):
    p = largest_pipeline(world)
    group, b, peaks = group_of(p), 2, {}
    for schedule, v in SCHEDULE_RUNS:
        for m in (p, 2 * p):
            engine = pipeline_engine(ProcessGrid(group, 1, p, 1), device, schedule, m, v)
            engine.train_step(0, TASK, b * m)
            peak, pipe = engine.ledger.peak("activation"), engine.pipeline
            f, w = zip(*(one_microbatch_bytes(pipe, c, b) for c in range(v)))
            agree(group, list(f) == pipe.microbatch_activation_bytes(TASK, b), "one F's bytes")
            expected = implied_peak(pipe.executed, f, w)
            agree(group, peak == expected, f"{schedule} m={m}: peak {peak} != implied {expected}")
            peaks[schedule, m] = peak, f[0]
    r = group.rank
    gpipe = [peaks["gpipe", m] for m in (p, 2 * p)]
    agree(group, all(peak == m * f for (peak, f), m in zip(gpipe, (p, 2 * p))), f"GPipe: {gpipe}")
    for m in (p, 2 * p):   # 1F1B: min(p - r, m) micro-batches, whatever m
        peak, f = peaks["1f1b", m]
        agree(group, peak == min(p - r, m) * f, f"1F1B m={m}: peak {peak} != {min(p - r, m)} x {f}")
        # ZB-H1: 1F1B's full activations, plus on rank r up to r waiting W's (their matmul
        # inputs only), never more than p micro-batches' worth: the pipeline's peak is 1F1B's
        zb_in_flight = schedules.in_flight_peak(schedules.make_schedule("zb-h1", p, m)[r])
        zb = peaks["zb-h1", m][0]
        agree(group, zb_in_flight == min(p - r, m) and peak <= zb <= p * f,
              f"ZB-H1 m={m}: {zb_in_flight} full activations in flight, peak {zb} vs 1F1B {peak}, f {f}")
        agree(group, group.max_(zb) == group.max_(peak),
              f"ZB-H1 m={m}: the pipeline's peak {group.max_(zb)} != 1F1B's {group.max_(peak)}")


@pytest.mark.mpi
@pytest.mark.parametrize("schedule, v", SCHEDULE_RUNS)
def test_each_boundary_carries_bsh_per_microbatch_each_way(world, group_of, device, schedule, v):
    p = largest_pipeline(world)
    group, m, b = group_of(p), p, 2
    engine = pipeline_engine(ProcessGrid(group, 1, p, 1), device, schedule, m, v, config(p * v))
    with group.ledger.measure() as calls:
        engine.train_step(0, TASK, b * m)
    per_boundary = pp_comm_elements(b, TASK.seq_len, engine.cfg.d_model, m)   # b*s*h*m, one way
    mine = [virtual_stage(group.rank, c, p) for c in range(v)]
    ends = sum(s < p * v - 1 for s in mine) + sum(s > 0 for s in mine)   # my boundaries x directions
    sent = calls.total_elements(group="pp", op="isend")
    received = calls.total_elements(group="pp", op="recv")
    agree(group, sent == received == ends * per_boundary,
          f"sent {sent}, received {received}, expected {ends} x {per_boundary}")
    total = group.sum_(sent)   # over the pipeline: 2 directions x (p*v - 1) boundaries
    agree(group, total == 2 * (p * v - 1) * per_boundary, f"pipeline total {total}")
