# OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 8 .venv/bin/python -m mpi4py -m pytest -m "cp and mpi" -p no:cacheprovider -q tests/test_cp_accounting.py
"""Context parallelism, exact accounting: what the ledgers say equals the formulas of formulas.py.

* the comm ledger's cp traffic of one step == cp_ring_comm_elements / cp_ulysses_comm_elements;
* per-rank attention FLOPs (the chunk pairs that ran): zigzag equal, contiguous (r+1)x;
* the saved attention inputs 1/cp of serial, and a step's activation peak serial/cp;
* the grid's cp, dp x cp and other groups hold the ranks of rank = ((d*pp + p)*cp + c)*tp + t.
"""
import numpy as np
import pytest

from minipar import formulas, ops
from minipar.autograd import Tensor, track_saved
from minipar.comm.grid import ProcessGrid
from minipar.parity import agree
from minipar.engine import Engine, Layout
from minipar.memory import MemoryLedger
from minipar.parallel.context.ring_attention import RingAttention
from minipar.parallel.context.split import ContextSplit

from helpers import CP_OPTIM as OPTIM, CP_SEED as SEED, CP_TASK as TASK, cp_config as config

pytestmark = [pytest.mark.cp, pytest.mark.mpi]

@pytest.mark.parametrize("algo", ["ring", "ulysses"])
def test_cp_traffic_equals_the_formula_exactly(world, grid_of, device, algo):
    """One step's cp-group bytes from the comm ledger == formulas.py's formula: ring
    (cp-1) K/V blocks forward and (cp-1) K/V + cp dK/dV backward per layer; Ulysses
    4 all-to-alls per layer of 4bsh/(cp tp)(cp-1)/cp in all each way."""
    cp, tp, m, batch = (4, 2, 2, 4) if world.size >= 8 else (2, 2, 2, 4)
    grid = grid_of(tp=tp, cp=cp)
    cfg = config(n_layer=2)
    engine = Engine(cfg, Layout(cp=cp, tp=tp, cp_algo=algo, micro_batches=m), OPTIM, seed=SEED, grid=grid,
                    device=device)
    engine.train_step(0, TASK, batch)                            # warm-up: nothing differs, but be plain
    with grid.world.ledger.measure() as step:
        engine.train_step(1, TASK, batch)
    b, s, h, L = batch // m, cfg.seq_len, cfg.d_model, cfg.n_layer
    formula = formulas.cp_ring_comm_elements if algo == "ring" else formulas.cp_ulysses_comm_elements
    want = sum(formula(b, s, h, cp, tp, L)) * m * 8              # float64 bytes
    got = step.total_bytes(group="cp")
    agree(grid.world, got == want, f"{algo}: cp traffic {got} bytes != formula {want}")
    ops_seen = {e.op for e in step.entries if e.group == "cp" and e.bytes}
    expect = {"isend", "sendrecv"} if algo == "ring" else {"all_to_all"}
    agree(grid.world, ops_seen == expect, f"{algo}: cp ops {ops_seen} != {expect}")
    if grid.world.rank == 0:
        print(f"\n[cp] {algo} cp={cp} tp={tp}: {got} bytes per step per rank == formula {want}")


def test_zigzag_balances_attention_flops_and_contiguous_does_not(world, grid_of, device):
    """Per-rank attention FLOPs of one step, from the ledger: zigzag equal on every rank,
    contiguous rank r doing (r+1) times rank 0's work."""
    cp = 4 if world.size >= 4 else 2
    grid, cfg, batch = grid_of(cp=cp), config(), 2
    flops = {}
    for split in ("zigzag", "contiguous"):
        engine = Engine(cfg, Layout(cp=cp, cp_split=split), OPTIM, seed=SEED, grid=grid, device=device)
        work = engine.model.seq_chunk.work
        work.reset()
        engine.train_step(0, TASK, batch)
        flops[split] = grid.cp_group.allgather_object((work.flops("forward"), work.flops("backward")))
    L, n_layer, D, H = cfg.seq_len // cp, cfg.n_layer, cfg.d_model // cfg.n_head, cfg.n_head
    unit = formulas.attention_pair_flops(batch, H, L, L, D) * n_layer      # one (T/cp)^2 block, all layers
    zig = [f for f, _ in flops["zigzag"]]
    con = [f for f, _ in flops["contiguous"]]
    agree(grid.world, len(set(zig)) == 1 and zig[0] == (2 * cp + 1) * unit // 4,
          f"zigzag forward FLOPs per rank {zig}, want all {(2 * cp + 1) * unit // 4}")
    agree(grid.world, con == [(r + 1) * unit for r in range(cp)], f"contiguous FLOPs {con}")
    back = [b for _, b in flops["zigzag"]]
    agree(grid.world, back == [f * 10 // 4 for f in zig], f"backward FLOPs {back}")
    if grid.world.rank == 0:
        print(f"\n[cp] attention forward FLOPs per rank, cp={cp}: contiguous {con}, zigzag {zig}")


def test_attention_inputs_saved_per_rank_are_serial_over_cp(world, grid_of):
    """The memory ledger's saved bytes of the ring attention core (its input qkv, o, lse):
    the qkv part is exactly 1/cp of what the serial core saves for q, k, v."""
    cp = 4 if world.size >= 4 else 2
    grid, cfg, B = grid_of(cp=cp), config(), 2
    T, C, H = cfg.seq_len, cfg.d_model, cfg.n_head
    rng = np.random.default_rng(0)
    full = rng.standard_normal((B, T, 3 * C))                              # (B, T, 3C) packed qkv
    split = ContextSplit(T, cp, grid.cp_rank, "zigzag")
    with track_saved(MemoryLedger(0)) as serial_ledger:
        ops.causal_attention(Tensor(full, requires_grad=True), H)
    with track_saved(MemoryLedger(0)) as cp_ledger:
        RingAttention.apply(Tensor(full[:, split.positions()].copy(), requires_grad=True),
                            n_head=H, split=split, group=grid.cp_group)
    serial_qkv = serial_ledger.current("activation") - B * H * T * T * 8    # minus the (T, T) softmax
    ring = cp_ledger.current("activation")
    want = formulas.cp_attention_saved_elements(B, T, C, H, cp) * 8
    agree(grid.world, ring == want, f"ring attention saved {ring} bytes, formula {want}")
    agree(grid.world, 3 * B * T * C * 8 // cp * cp == serial_qkv and
          ring - (B * T * C + B * H * T) * 8 // cp == serial_qkv // cp,
          f"attention inputs: ring keeps {ring} bytes, serial q,k,v {serial_qkv}")


# ----------------------------------------------------------------------------- MPI: the grid
@pytest.mark.parametrize("dims", [(2, 1, 2, 2), (1, 2, 2, 2), (2, 2, 2, 1), (1, 1, 8, 1), (4, 1, 2, 1)])
def test_cp_groups_hold_the_right_ranks(world, dims):
    """rank = ((d*pp + p)*cp + c)*tp + t: tp fastest, then cp, pp, dp; dp_cp = same (p, t)."""
    if world.size != 8:
        pytest.skip("written for 8 ranks")
    from minipar.comm.grid import grid_rank
    dp, pp, cp, tp = dims
    grid = ProcessGrid(world, dp, pp, tp, cp)
    d, p, c, t = grid.dp_rank, grid.pp_rank, grid.cp_rank, grid.tp_rank
    at = lambda d_, p_, c_, t_: grid_rank(d_, p_, t_, pp, tp, c_, cp)   # noqa: E731
    want = {"tp": [at(d, p, c, i) for i in range(tp)], "cp": [at(d, p, i, t) for i in range(cp)],
            "pp": [at(d, i, c, t) for i in range(pp)], "dp": [at(i, p, c, t) for i in range(dp)],
            "dp_cp": [at(i, p, j, t) for i in range(dp) for j in range(cp)],
            "mp": [at(d, i, c, j) for i in range(pp) for j in range(tp)]}
    groups = {"tp": grid.tp_group, "cp": grid.cp_group, "pp": grid.pp_group, "dp": grid.dp_group,
              "dp_cp": grid.dp_cp_group, "mp": grid.mp_group}
    bad = [f"{k}: {list(g.ranks)} != {want[k]}" for k, g in groups.items() if list(g.ranks) != want[k]]
    agree(world, at(d, p, c, t) == world.rank and not bad, f"{dims}: {bad}")


def test_whole_step_activation_peak_is_serial_over_cp(world, grid_of, device):
    """From the memory ledger, one step (no dropout): every saved activation of a cp rank
    covers its T/cp tokens, so the peak is the serial peak / cp, except that attention keeps
    o and the log-sum-exp (b·s·h + b·a·s per layer, / cp) instead of the a·s²·b softmax, plus
    the 8-byte scalar loss that the cp loss weight's multiply saves."""
    cp = 4 if world.size >= 4 else 2
    grid, cfg, B = grid_of(cp=cp), config(), 2
    T, C, H, L = cfg.seq_len, cfg.d_model, cfg.n_head, cfg.n_layer
    serial = Engine(cfg, Layout(), OPTIM, seed=SEED, device=device)
    local = Engine(cfg, Layout(cp=cp), OPTIM, seed=SEED, grid=grid, device=device)
    serial.train_step(0, TASK, B)
    local.train_step(0, TASK, B)
    got, base = local.ledger.peak("activation"), serial.ledger.peak("activation")
    want = (base - L * B * H * T * T * 8 + L * (B * T * C + B * H * T) * 8) // cp + 8
    agree(grid.world, got == want, f"cp={cp}: activation peak {got} bytes per rank, want {want} (serial {base})")
