# OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 8 .venv/bin/python -m mpi4py -m pytest -m mpi -p no:cacheprovider -q tests/test_expert_parallel.py
"""Expert parallelism equals the serial mixture of experts, over layouts with dp, ep, tp, pp, ZeRO.

One Engine carves ep groups out of dp, holds E/ep experts per rank and moves tokens with
Alltoallv; the serial Engine (Layout.serial_of_dp: the same global micro-batches) is the
oracle. After every step the loss, every gradient, parameter, Adam m and v and the global
gradient norm must agree (parity.check, a collective verdict over the block of ranks).
Routing ties (a zeroed router: every token picks experts 0..k-1) leave experts, and whole
ranks, without tokens; capacity drops slots in global order. The all-to-all bytes of each
step in the ledger equal the formula of its routing counts.
"""
import pytest
from hypothesis import given, settings, strategies as st

from minipar import parity
from minipar.comm.group import Group
from minipar.parity import agree
from minipar.engine import Engine, Layout
from minipar.lockstep import lockstep

from helpers import EP_OPTIM, EP_RUN, EP_SEED, ep_config

pytestmark = [pytest.mark.mpi, pytest.mark.ep]

WORLD = Group.world().size


def tie_router(step, *engines):
    """Before the first step, zero every router weight: all probabilities 1/E, so every token
    ties and goes to experts 0..k-1."""
    if step > 0:
        return
    for engine in engines:
        for p in engine.params:
            if p.name.endswith("router.weight"):
                p.data[...] = 0.0


def run(grid, device, cfg, layout, batch, steps=2, ties=False):
    """lockstep (minipar/lockstep.py) of the expert-parallel run and its serial oracle (the same
    global micro-batches: lockstep.serial_layout); returns the Outcome."""
    return lockstep(cfg, layout, batch=batch, steps=steps, grid=grid, before_step=tie_router if ties else None,
                    device=device, **EP_RUN)


def report(world, name, worst):
    if world.rank == 0:
        print(f"\n[ep] {name}: max rel err {worst:.2e}")


# ----------------------------------------------------------------------------- the matrix
# (id, (dp, pp, tp), Layout extras, config extras, batch, ties)
MATRIX = [
    ("dp8-ep8", (8, 1, 1), dict(ep=8), {}, 8, False),
    ("dp8-ep4-ties", (8, 1, 1), dict(ep=4), {}, 8, True),
    ("dp4-tp2-ep2", (4, 1, 2), dict(ep=2), {}, 8, False),
    ("dp4-pp2-ep2-m2", (4, 2, 1), dict(ep=2, micro_batches=2), {}, 8, False),
    ("dp8-ep4-zero2", (8, 1, 1), dict(ep=4, zero=2), {}, 8, False),
    ("dp2-pp2-tp2-ep2-zero1-capacity", (2, 2, 2), dict(ep=2, zero=1, micro_batches=2),
     dict(capacity=1.0, moe_every=2, n_layer=4), 8, False),
]


@pytest.mark.parametrize("name, dims, lay, cfg_kw, batch, ties", MATRIX, ids=[r[0] for r in MATRIX])
def test_expert_parallel_matrix_equals_serial(world, grid_of, device, name, dims, lay, cfg_kw, batch, ties):
    if WORLD < 8:
        pytest.skip("the expert-parallel matrix runs on 8 ranks")
    dp, pp, tp = dims
    outcome = run(grid_of(dp, pp, tp), device, ep_config(**cfg_kw), Layout(dp=dp, pp=pp, tp=tp, **lay), batch,
                  ties=ties)
    report(world, name, outcome.worst)


# ----------------------------------------------------------------------------- property-based
@st.composite
def layouts(draw):
    """A valid expert-parallel layout on n in {2, 4, 8} ranks dividing the job (valid draws only)."""
    n = draw(st.sampled_from([k for k in (8, 4, 2) if WORLD % k == 0]), label="n")
    tp = draw(st.sampled_from([t for t in (2, 1) if n % t == 0]), label="tp")
    pp = draw(st.sampled_from([p for p in (2, 1) if (n // tp) % p == 0]), label="pp")
    dp = n // (tp * pp)
    ep = draw(st.sampled_from([e for e in (dp, 2, 1) if dp % e == 0]), label="ep")
    experts = max(ep, 4) * draw(st.integers(1, 2), label="experts/max(ep, 4)")
    ties = draw(st.booleans(), label="ties")
    # k < E, and k = 1 only with ties: with k = E or k = 1 the gates are constant, so the router
    # learns from the aux loss alone, which is exactly 0 (pure rounding) when the load is balanced
    k = draw(st.integers(1 if ties else 2, 3), label="k")
    m = draw(st.integers(1, 2), label="m")
    zero = draw(st.sampled_from([0, 1, 2]), label="zero")
    capacity = draw(st.sampled_from([None, 1.0]), label="capacity")
    cfg = ep_config(experts, k, n_layer=2, capacity=capacity)
    return dp, pp, tp, dict(ep=ep, micro_batches=m, zero=zero), cfg, dp * m, ties


@settings(max_examples=6)
@given(drawn=layouts())
def test_any_expert_layout_with_ties_and_empty_experts_equals_serial(world, grid_of, device, drawn):
    dp, pp, tp, lay, cfg, batch, ties = drawn
    worst = run(grid_of(dp, pp, tp), device, cfg, Layout(dp=dp, pp=pp, tp=tp, **lay), batch, ties=ties).worst
    report(world, f"dp{dp} pp{pp} tp{tp} {lay} E={cfg.experts} k={cfg.top_k} "
                  f"cf={cfg.capacity_factor} ties={ties}", worst)


# ----------------------------------------------------------------------------- traffic and routing
def test_all_to_all_bytes_equal_the_formula_of_the_routing_counts(world, grid_of, device):
    """Per step and rank: ledger all_to_all_v bytes == 2 (sent + received rows) C itemsize summed
    over the MoE layers; and the rows one rank sends to another are the rows that one receives."""
    n = 4 if WORLD >= 4 else 2
    grid = grid_of(n, 1, 1)
    cfg = ep_config(experts=2 * n, k=2)
    local = run(grid, device, cfg, Layout(dp=n, ep=n), 2 * n, steps=2).local
    ok = all(r["ledger_bytes"] == r["formula_bytes"] > 0 for r in local.expert_log)
    agree(grid.world, ok, f"all_to_all_v bytes vs formula: {[(r['ledger_bytes'], r['formula_bytes']) for r in local.expert_log]}")
    moe = local.model.blocks[0].mlp
    send, recv = moe.exchange                                      # (ep,) rows per peer, last forward
    every = grid.world.allgather_object((send.tolist(), recv.tolist()))
    me = grid.world.rank
    sent_to_me = [every[s][0][me] for s in range(n)]
    agree(grid.world, sent_to_me == recv.tolist(), f"rank {me} received {recv.tolist()}, was sent {sent_to_me}")
    counts = local.expert_log[-1]["layers"][0]["tokens"]
    agree(grid.world, sum(counts) == 2 * n * cfg.seq_len * cfg.top_k, f"global routing counts {counts}")


def test_invalid_expert_layouts_raise_before_any_collective(grid_of, device):
    grid = grid_of(2, 1, 1)
    for cfg, lay, words in ((ep_config(experts=3), Layout(dp=2, ep=2), "--ep 2 does not divide --experts 3"),
                            (ep_config(experts=4), Layout(dp=2, ep=4), "--ep 4 does not divide --dp 2"),
                            (ep_config(experts=0), Layout(dp=2, ep=2), "--ep 2 needs a mixture")):
        mark = grid.world.ledger.snapshot()
        try:
            Engine(cfg, lay, EP_OPTIM, EP_SEED, grid, device=device)
            error = None
        except ValueError as err:
            error = err
        calls = grid.world.ledger.since(mark).entries
        agree(grid.world, error is not None and words in str(error), f"expected {words!r}, got {error!r}")
        agree(grid.world, not calls, f"{len(calls)} communication calls before the error")


def test_checkpoint_of_an_expert_parallel_trainedloads_into_the_serial_model(grid_of, device, tmp_path):
    """Each ep rank writes its own experts (not only dp rank 0), so the checkpoint holds the
    whole serial model: loaded serially it equals the serial run, parameters and Adam state."""
    from minipar import checkpoint
    n = 4 if WORLD >= 4 else 2
    grid = grid_of(n, 1, 1)
    path = grid.world.bcast_object(str(tmp_path / "ckpt"))
    cfg = ep_config(experts=2 * n, k=2)
    trained = run(grid, device, cfg, Layout(dp=n, ep=n), 2 * n, steps=2)
    checkpoint.save(path, trained.local, 2, grid.world)
    fresh = Engine(cfg, Layout(serial_of_dp=n), EP_OPTIM, EP_SEED, device=device)
    checkpoint.load(path, fresh)
    rows = parity.compare_models(fresh, trained.serial, quantities=("param", "m", "v"))
    parity.check(grid.world, rows, parity.TOLERANCE["fp64"], " (serial engine loaded from an ep checkpoint)")
