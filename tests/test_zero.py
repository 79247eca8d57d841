"""ZeRO-1/2/3 and ZeRO-Offload (parallel/zero/) against the serial run.

    serial:  every helper on one rank; the partition arithmetic; dp_group None
    MPI:     parity (property-based: stage x offload x dp x micro-batches x clipping),
             the memory ledger against the ZeRO formulas, the comm ledger against
             2Φ(N-1)/N and 3Φ(N-1)/N, Offload's traffic, and ZeRO with TP / PP.

The model is chosen so every unit has an odd number of parameters
(d_model = 9): every N > 1 pads every unit, so padding is always exercised.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.parity import agree
from minipar.engine import Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.formulas import (bytes_per_param, comm_elements_per_step, model_state_breakdown,
                              model_state_bytes_formula, padded_numel)
from minipar.memory import MemoryLedger
from minipar.layers import Parameter
from minipar.nn import GPT
from minipar.parallel.zero.partition import Partition, unit_groups
from minipar.parallel.zero.stages import make_zero

from helpers import TASK, alive_beyond_activations, zero_config, zero_engine, zero_run

pytestmark = pytest.mark.zero

DPS = (1, 2, 4, 8)


# ----------------------------------------------------------------------------- serial

@settings(max_examples=40)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5), n=st.integers(1, 6))
def test_partition_chunks_tile_every_unit_once(sizes, n):
    """Every entry of every unit, padding included, is owned by exactly one rank, in rank order."""
    params = [Parameter(np.zeros(s)) for s in sizes]
    parts = [Partition([("a", params[:1]), ("b", params[1:])] if len(params) > 1 else [("a", params)],
                       n, r) for r in range(n)]
    for i, unit in enumerate(parts[0].units):
        owned = np.concatenate([np.arange(unit.padded)[p.units[i].own] for p in parts])
        assert np.array_equal(owned, np.arange(unit.padded))
        assert unit.padded == padded_numel(unit.numel, n)
    assert parts[0].numel == sum(sizes)
    assert all(p.shard_size * n == p.padded for p in parts)
    assert sum(p.shard_pad for p in parts) == parts[0].padded - parts[0].numel


def test_units_per_stage():
    model = GPT(zero_config())
    params = model.parameters()
    assert [name for name, _ in unit_groups(params, 1)] == ["all"]
    buckets = unit_groups(params, 2, bucket_bytes=3000)
    assert [p for _, run in buckets for p in run] == params[::-1]      # backward order
    assert all(sum(p.data.nbytes for p in run) <= 3000 or len(run) == 1 for _, run in buckets)
    units = dict(unit_groups(params, 3, model))
    assert list(units) == ["root", "blocks.0", "blocks.1"]
    assert {p.name for p in units["root"]} == {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}


@pytest.mark.parametrize("stage,offload", [(0, True), (1, False), (2, True), (3, False), (3, True)])
def test_one_rank_is_the_plain_optimizer(device, stage, offload):
    """dp_group None (N = 1): ZeRO must reduce to the serial optimizer."""
    layout = Layout(zero=stage, offload=offload, micro_batches=2, bucket_bytes=2000)
    optim = OptimConfig(max_norm=0.05, weight_decay=0.1)
    assert lockstep(zero_config(), layout, batch=4, steps=3, tol=1e-12, device=device,
                    **zero_run(optim)).worst < 1e-12


def test_sgd_with_momentum_is_supported(device):
    optim = OptimConfig(name="sgd", lr=0.1, momentum=0.9)
    outcome = lockstep(zero_config(), Layout(zero=2), batch=4, steps=3, tol=1e-12, device=device, **zero_run(optim))
    assert outcome.worst < 1e-12
    assert set(outcome.local.optimizer.state()["wte.weight"]) == {"master", "momentum"}


def test_refusals_are_clear():
    model = GPT(zero_config())
    args = (OptimConfig(), model.precision, MemoryLedger(), model)
    with pytest.raises(ValueError, match="ZeRO-3 is supported with data parallelism only"):
        make_zero(model.parameters(), None, Layout(zero=3, tp=2), *args)
    with pytest.raises(ValueError, match="ZeRO-3 is supported with data parallelism only"):
        make_zero(model.parameters(), None, Layout(zero=3, pp=2), *args)
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"):
        make_zero(model.parameters(), None, Layout(zero=4), *args)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        make_zero(model.parameters(), None, Layout(zero=1), OptimConfig(name="lion"), *args[1:])


def test_stage3_keeps_only_the_shard_between_steps(device):
    engine = zero_engine(None, Layout(zero=3), device)
    engine.train_step(0, TASK, 4)
    zero = engine.optimizer
    assert all(p.data.strides == (0,) * p.data.ndim for p in engine.params)   # released placeholders
    assert engine.ledger.current("param") == zero.param_shard.nbytes
    with zero.gathered():
        assert engine.params[0].data.strides != (0, 0)
    assert engine.accuracy(TASK, n_samples=8) >= 0.0            # a no-grad forward gathers and releases
    assert engine.ledger.current("param") == zero.param_shard.nbytes


# ----------------------------------------------------------------------------- MPI: parity

def dps_for(world):
    return [d for d in DPS if world.size % d == 0]


def up_to_4(world):
    """4 ranks, or all of them in a smaller job (mpiexec -n 2)."""
    return min(world.size, 4)


@pytest.mark.mpi
@pytest.mark.offload
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@settings(max_examples=5)
@given(data=st.data())
def test_parity_with_the_serial_run(world, grid_of, device, stage, data):
    """fp64, k = 2-3 steps: params, grads, Adam m and v equal the serial run to 1e-10
    (measured worst over a full sweep of these draws on 8 ranks: 1.3e-13)."""
    dp = data.draw(st.sampled_from(dps_for(world)), "dp")
    offload = data.draw(st.booleans(), "offload")
    layout = Layout(dp=dp, zero=stage, offload=offload, micro_batches=data.draw(st.sampled_from([1, 2]), "m"),
                    bucket_bytes=data.draw(st.sampled_from([2000, 2 ** 20]), "bucket_bytes"))
    optim = OptimConfig(name=data.draw(st.sampled_from(["adamw", "adamw", "sgd"]), "optimizer"),
                        max_norm=data.draw(st.sampled_from([None, 0.05]), "max_norm"),
                        weight_decay=0.1, momentum=0.9)
    cfg = zero_config(dropout=data.draw(st.sampled_from([0.0, 0.1]), "dropout"))
    batch = dp * layout.micro_batches * data.draw(st.sampled_from([1, 2]), "per micro-batch")
    lockstep(cfg, layout, batch=batch, steps=data.draw(st.sampled_from([2, 3]), "steps"), grid=grid_of(dp),
             device=device, **zero_run(optim))


@pytest.mark.mpi
@pytest.mark.parametrize("precision,stage,offload", [("fp32", 1, False), ("fp32", 3, True),
                                                     ("mixed", 2, False), ("mixed", 3, True)])
def test_parity_in_low_precision(world, grid_of, device, precision, stage, offload):
    """fp32 within parity.TOLERANCE["fp32"] = 1e-4, mixed (fp16 params, loss scaling) within 5e-2."""
    n = up_to_4(world)
    lockstep(zero_config(precision), Layout(dp=n, zero=stage, offload=offload), batch=8, steps=3,
             grid=grid_of(n), device=device, **zero_run())


# ----------------------------------------------------------------------------- MPI: memory

def model_state_by_category(ledger, placement=None):
    return {c: ledger.current(c, placement) for c in ("param", "grad", "master", "optim_m", "optim_v")}


@pytest.mark.mpi
@pytest.mark.offload
@pytest.mark.parametrize("precision", ["mixed", "fp32"])
@pytest.mark.parametrize("stage,offload", [(0, False), (1, False), (2, False), (3, False),
                                           (0, True), (1, True), (2, True), (3, True)])
def test_memory_matches_the_zero_formulas(world, grid_of, device, precision, stage, offload):
    """Per rank: ledger bytes = formula(Φ_pad) exactly, padding included; summed over the
    dp group, each category's real bytes = N x formula(Φ) exactly (the padding excluded)."""
    n = up_to_4(world)
    engine = zero_engine(grid_of(n), Layout(dp=n, zero=stage, offload=offload), device, precision)
    engine.train_step(0, TASK, 8)
    led, dp = engine.ledger, engine.grid.dp_group
    zero = engine.optimizer if stage or offload else None
    phi = sum(p.data.size for p in engine.params)
    phi_pad = zero.numel_padded if zero else phi
    extra_host = 0   # Offload keeps a host master even where the policy keeps none
    itemsize = bytes_per_param(precision)["param"]
    if offload and precision != "mixed":
        extra_host = zero.shard_size * itemsize
    want = model_state_bytes_formula(phi_pad, n, stage, precision, offload)
    got = ((led.model_state_bytes("device"), led.model_state_bytes("host") - extra_host) if offload
           else led.model_state_bytes())
    agree(dp, got == want, f"model-state bytes {got} != formula {want} (Φ_pad={phi_pad})")
    real = np.array(list(model_state_by_category(led).values()), dtype=np.float64)
    # all-reduce (sum) of 5 byte counts over dp
    total = dp.all_reduce(real, op="sum")
    expect = {c: n * b for c, b in model_state_breakdown(phi, n, stage, precision).items()}
    if extra_host:
        expect["master"] = (phi if stage else n * phi) * itemsize
    agree(dp, list(total) == [round(v) for v in expect.values()], f"{total} != {expect}")
    if offload:
        agree(dp, model_state_by_category(led, "host")["optim_m"] == led.current("optim_m"),
              "Offload: Adam states must all be on the host")


@pytest.mark.mpi
def test_stage3_releases_each_unit_after_use(grid_of, device):
    """The param peak of a ZeRO-3 step is the shard plus the root and one Block, never the model."""
    engine = zero_engine(grid_of(2), Layout(dp=2, zero=3), device, "mixed")
    engine.ledger.reset_peak()
    engine.train_step(0, TASK, 4)
    zero, led = engine.optimizer, engine.ledger
    root, *blocks = zero.part.units
    shard = 2 * (zero.shard_size - zero.part.shard_pad)                # fp16 bytes, padding apart
    want = (shard + 2 * (root.numel + max(b.numel for b in blocks)), shard)
    got = (led.peak("param"), led.current("param"))
    agree(zero.group, got == want, f"param bytes (peak, now) {got}; want {want}")


@pytest.mark.mpi
def test_stage3_released_units_are_really_freed(grid_of, device):
    """tracemalloc cross-check of the ledger: after a ZeRO-3 forward, what is alive is the saved
    activations plus small change, far below one Block: every gathered unit was freed."""
    engine = zero_engine(grid_of(2), Layout(dp=2, zero=3), device, d_model=48, n_head=4)   # Blocks of 28k entries
    engine.train_step(0, TASK, 4)
    extra, block = alive_beyond_activations(engine)
    agree(engine.grid.dp_group, extra < block / 2,
          f"{extra} bytes alive after forward beyond the activations; one Block is {block}")


# ----------------------------------------------------------------------------- MPI: communication

@pytest.mark.mpi
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_comm_volume_per_step(grid_of, device, stage, n):
    """Elements sent per rank over dp in one step: 2Φ(N-1)/N for DP, ZeRO-1, ZeRO-2 (Φ padded),
    3Φ(N-1)/N for ZeRO-3: the gradient all-reduce / reduce-scatter and the parameter all-gathers."""
    engine = zero_engine(grid_of(n), Layout(dp=n, zero=stage, bucket_bytes=3000), device, "mixed")
    ledger = engine.grid.dp_group.ledger
    with ledger.measure() as step:
        engine.train_step(0, TASK, 2 * n)
    moved = [e for e in step.entries if e.group == "dp" and e.elements > 1]    # not the logged loss
    elements = sum(e.bytes for e in moved) / 2                                  # fp16: 2 bytes each
    phi = engine.optimizer.numel_padded if stage else sum(p.data.size for p in engine.params)
    want = comm_elements_per_step(phi, n, stage)
    ops = sorted({e.op for e in moved})
    agree(engine.grid.dp_group, np.isclose(elements, want, rtol=1e-12, atol=0)
          and ops == (["all_reduce"] if stage == 0 else ["all_gather", "reduce_scatter"]),
          f"zero={stage}: {elements} elements by {ops}, want {want}")


@pytest.mark.mpi
@pytest.mark.offload
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_traffic_and_device_savings(world, grid_of, device, stage):
    """Each step moves the fp16 grad shard down and the fp16 param shard up (2S bytes each);
    the device holds K·Φ/N = 12 S bytes less than without Offload, the host exactly that."""
    n = up_to_4(world)
    on = zero_engine(grid_of(n), Layout(dp=n, zero=stage, offload=True), device, "mixed")
    off = zero_engine(grid_of(n), Layout(dp=n, zero=stage), device, "mixed")
    for engine in (on, off):
        engine.train_step(0, TASK, 8)
    s = on.optimizer.shard_size
    report = on.optimizer.report()
    got = (report["bytes_to_host"], report["bytes_to_device"], on.ledger.model_state_bytes("host"),
           off.ledger.model_state_bytes("device") - on.ledger.model_state_bytes("device"))
    agree(on.grid.world, got == (2 * s, 2 * s, 12 * s, 12 * s), f"offload numbers {got}, S={s}")


# ----------------------------------------------------------------------------- MPI: with TP / PP

@pytest.mark.mpi
@getattr(pytest.mark, "3d")
@pytest.mark.parametrize("stage,offload", [(0, True), (1, False), (2, False), (2, True)])
@pytest.mark.parametrize("pp,tp,tied", [(1, 2, True), (2, 1, True), (2, 1, False)])
def test_zero_with_tensor_and_pipeline_parallelism(grid_of, device, stage, offload, pp, tp, tied):
    """3D: ZeRO-1/2 (and Offload) over the grid's dp group, on whatever parameters TP / PP
    leave a rank; replicas (norm_owner False) must drop out of the clipping norm."""
    layout = Layout(dp=2, pp=pp, tp=tp, zero=stage, offload=offload, micro_batches=2, bucket_bytes=2000)
    cfg = zero_config(n_head=4, d_model=8, vocab_size=12, tied_embeddings=tied)
    lockstep(cfg, layout, batch=8, steps=2, grid=grid_of(2, pp, tp), device=device,
             **zero_run(OptimConfig(max_norm=0.05)))


@pytest.mark.mpi
@getattr(pytest.mark, "3d")
def test_zero3_refuses_model_parallelism(grid_of, device):
    with pytest.raises(ValueError, match="ZeRO-3 is supported with data parallelism only"):
        zero_engine(grid_of(2, tp=2), Layout(dp=2, tp=2, zero=3), device, n_head=4, d_model=8, vocab_size=12)

