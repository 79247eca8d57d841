# OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 8 .venv/bin/python -m mpi4py -m pytest -m "cp and mpi" -p no:cacheprovider -q tests/test_context_parallel.py
"""Context parallelism: ring attention and Ulysses over a cp grid axis equal the serial run.

Serial (no MPI): the zigzag split and its balance, the log-sum-exp merge of attention
blocks against full attention (forward and backward), the cp rules and formulas.

MPI: float64 sharded == serial (loss, every gradient, parameter, Adam m and v) over
hypothesis-drawn layouts with cp in {1, 2, 4, 8} crossed with dp, tp, SP, pp (each
schedule), ZeRO 1-3, ring or Ulysses, zigzag or contiguous, dropout on or off; the
done-when layouts as a fixed matrix. Traffic, FLOPs and memory against the formulas
are tests/test_cp_accounting.py; the bug zoo is tests/test_cp_bugzoo.py.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipar import formulas, ops, parity
from minipar.args import UsageError, build_parser
from minipar.autograd import Tensor
from minipar.engine import Layout
from minipar.layout import check_context_parallel, check_split
from minipar.lockstep import lockstep
from minipar.parallel.context import online_softmax as osm
from minipar.parallel.context.split import ContextSplit
from minipar.train import configure

from helpers import CP_RUN, cp_config

pytestmark = pytest.mark.cp

# ----------------------------------------------------------------------------- serial: the split
@pytest.mark.parametrize("cp", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["zigzag", "contiguous"])
def test_every_token_is_held_by_exactly_one_rank(cp, kind):
    split = ContextSplit(16, cp, 0, kind)
    assert sorted(split.all_positions().tolist()) == list(range(16))
    if kind == "zigzag":
        assert split.chunks(0) == (0, 2 * cp - 1)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_pairs_are_equal_and_contiguous_grow_with_rank(cp):
    zig = [ContextSplit(32, cp, r, "zigzag").pairs() for r in range(cp)]
    con = [ContextSplit(32, cp, r, "contiguous").pairs() for r in range(cp)]
    assert all(z == (2 * cp + 1, 2) for z in zig)                     # 2cp+1 pairs, 2 diagonal
    assert [c[0] for c in con] == list(range(1, cp + 1))              # rank r: r+1 pairs


def test_split_refuses_a_sequence_that_does_not_cut():
    with pytest.raises(ValueError, match="divisible by 8"):
        check_split(12, 4, "zigzag")
    check_split(12, 4, "contiguous")


def test_cp_rules_name_the_constraint():
    with pytest.raises(ValueError, match="--n-head 2 is not divisible by --tp 2 x --cp 2"):
        check_context_parallel(cp_config(n_head=2), 2, "ulysses", tp=2)
    with pytest.raises(ValueError, match="--sequence-parallel with --cp 4 .* over --tp 8: not divisible"):
        check_context_parallel(cp_config(), 4, "ring", tp=8, sequence_parallel=True)
    with pytest.raises(ValueError, match="--cp-algo 'stripes' is unknown"):
        check_context_parallel(cp_config(), 2, "stripes")


@pytest.mark.parametrize("flags, words", [
    (["--cp", "8", "--n-digits", "4"], "--cp 8 cuts the sequence into 2*cp = 16 zigzag chunks: seq_len=8"),
    (["--cp", "2", "--cp-algo", "ulysses", "--tp", "4", "--n-head", "4"], "--n-head 4 is not divisible by --tp 4 x --cp 2"),
    (["--cp", "3"], "--pp 1 x --tp 1 x --cp 3 = 3 does not divide the 8 ranks"),
])
def test_train_refuses_bad_cp_flags_in_one_line(flags, words):
    with pytest.raises(UsageError, match=words.replace("*", r"\*")):
        configure(build_parser().parse_args(flags), 8)


def test_train_builds_the_cp_layout():
    _, layout, _, _ = configure(build_parser().parse_args(["--cp", "2", "--cp-algo", "ulysses"]), 8)
    assert (layout.dp, layout.cp, layout.cp_algo, layout.world_size) == (4, 2, "ulysses", 8)


# ----------------------------------------------------------------------------- serial: the math
def _qkv(rng, B=2, H=3, T=8, D=4):
    return [rng.standard_normal((B, H, T, D)) for _ in range(3)]


@pytest.mark.parametrize("n_blocks", [1, 2, 4])
def test_blockwise_merge_equals_full_causal_attention(n_blocks):
    """Forward: blocks of keys merged by log-sum-exp == softmax over all keys; backward: the
    per-block gradients from the final lse add up to the serial op's gradient."""
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng)
    B, H, T, D = q.shape
    packed = np.stack((q, k, v), axis=3).transpose(0, 2, 1, 3, 4).reshape(B, T, H * 3 * D)   # (B, T, H*3D)
    full = Tensor(packed, requires_grad=True)
    want = ops.causal_attention(full, H)                                   # (B, T, H*D)
    g = rng.standard_normal(want.shape)
    want.backward(g)
    L, scale = T // n_blocks, 1 / math.sqrt(D)
    o, lse = np.zeros_like(q), np.full(q.shape[:-1], -np.inf)
    for i in range(n_blocks):
        rows = slice(i * L, (i + 1) * L)
        for j in range(i + 1):                                            # j > i: future, skipped
            cols = slice(j * L, (j + 1) * L)
            ob, lb = osm.block_forward(q[:, :, rows], k[:, :, cols], v[:, :, cols], scale, i == j)
            o[:, :, rows], lse[:, :, rows] = osm.merge(o[:, :, rows], lse[:, :, rows], ob, lb)
    got = o.transpose(0, 2, 1, 3).reshape(B, T, H * D)
    assert parity.rel_err(got, want.data) < 1e-13
    do = g.reshape(B, T, H, D).transpose(0, 2, 1, 3)
    delta = (do * o).sum(-1)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for i in range(n_blocks):
        rows = slice(i * L, (i + 1) * L)
        for j in range(i + 1):
            cols = slice(j * L, (j + 1) * L)
            a, b, c = osm.block_backward(q[:, :, rows], k[:, :, cols], v[:, :, cols], do[:, :, rows],
                                         lse[:, :, rows], delta[:, :, rows], scale, i == j)
            dq[:, :, rows] += a
            dk[:, :, cols] += b
            dv[:, :, cols] += c
    grad = np.stack((dq, dk, dv), axis=3).transpose(0, 2, 1, 3, 4).reshape(B, T, H * 3 * D)
    assert parity.rel_err(grad, full.grad) < 1e-12


def test_cp_formulas():
    assert formulas.cp_ring_comm_elements(2, 16, 8, 4, 2) == (3 * 64, 7 * 64)    # block 2*2*16*8/(4*2) = 64
    fwd, bwd = formulas.cp_ulysses_comm_elements(2, 16, 8, 4, 1)
    assert fwd == bwd == 4 * 2 * 16 * 8 * 3 / 16
    assert formulas.cp_attention_saved_elements(2, 16, 8, 4, 4) == (3 * 256 + 256 + 128) // 4


# ----------------------------------------------------------------------------- MPI: parity
def run(grid, device, dims, lay, cfg_kw, batch):
    """lockstep (minipar/lockstep.py) of the cp run of `dims` = (dp, pp, cp, tp) and the serial
    one: a collective parity verdict after every step."""
    dp, pp, cp, tp = dims
    return lockstep(cp_config(**cfg_kw), Layout(dp=dp, pp=pp, cp=cp, tp=tp, **lay), batch=batch, grid=grid,
                    device=device, **CP_RUN).worst


def cp_grid(grid_of, dims):
    dp, pp, cp, tp = dims
    return grid_of(dp, pp, tp, cp)


def report(grid, name, worst):
    if grid.world.rank == 0:
        print(f"\n[cp] {name}: max rel err {worst:.2e}")


# the done-when layouts (8 ranks), and a few more: (id, (dp, pp, cp, tp), Layout extras, cfg extras)
MATRIX = [
    ("cp2-dp4", (4, 1, 2, 1), {}, {}),
    ("cp4-tp2-sp", (1, 1, 4, 2), dict(sequence_parallel=True), dict(dropout=0.1)),
    ("cp2-pp2-tp2-m4", (1, 2, 2, 2), dict(micro_batches=4), {}),
    ("cp2-dp4-zero3", (4, 1, 2, 1), dict(zero=3), {}),
    ("cp8", (1, 1, 8, 1), {}, dict(dropout=0.1)),
    ("cp2-dp4-ulysses", (4, 1, 2, 1), dict(cp_algo="ulysses"), {}),
    ("cp2-pp2-tp2-sp-interleaved", (1, 2, 2, 2), dict(sequence_parallel=True, schedule="interleaved",
                                                       virtual_stages=2, micro_batches=2),
     dict(n_layer=4, dropout=0.1)),
    ("cp4-pp2-zb-h1-zero1", (1, 2, 4, 1), dict(schedule="zb-h1", micro_batches=2, zero=1), dict(dropout=0.1)),
]


@pytest.mark.mpi
@pytest.mark.parametrize("name, dims, lay, cfg_kw", MATRIX, ids=[r[0] for r in MATRIX])
def test_done_when_layouts_equal_serial(world, grid_of, device, name, dims, lay, cfg_kw):
    if world.size < 8:
        pytest.skip("the done-when layouts run on 8 ranks")
    grid = cp_grid(grid_of, dims)
    report(grid, name, run(grid, device, dims, lay, cfg_kw, 8))


def divisors(n):
    return [d for d in range(n, 0, -1) if n % d == 0]


@st.composite
def layouts(draw, world_size):
    """A valid (dims, Layout extras, cfg extras, batch) on n in {8, 4, 2} ranks with cp >= 1."""
    n = draw(st.sampled_from([k for k in (8, 4, 2) if world_size % k == 0]), label="n")
    cp = draw(st.sampled_from(divisors(n)), label="cp")
    tp = draw(st.sampled_from(divisors(n // cp)), label="tp")
    pp = draw(st.sampled_from(divisors(n // (cp * tp))), label="pp")
    dp = n // (cp * tp * pp)
    algo = draw(st.sampled_from(["ring", "ulysses"] if 8 % (tp * cp) == 0 else ["ring"]), label="algo")
    split = draw(st.sampled_from(["zigzag", "contiguous"]), label="split")
    schedule = draw(st.sampled_from(["1f1b", "gpipe", "zb-h1", "interleaved"] if pp > 1 else ["1f1b"]),
                    label="schedule")
    m = pp if schedule == "interleaved" else draw(st.integers(1, 2), label="m")
    zero = draw(st.sampled_from([0, 1, 2] + ([3] if pp == tp == 1 else [])), label="zero")
    sp = draw(st.booleans(), label="sp") if tp > 1 and (16 // cp) % tp == 0 else False
    dropout = draw(st.sampled_from([0.0, 0.1]), label="dropout")
    lay = dict(cp_algo=algo, cp_split=split, schedule=schedule, micro_batches=m, zero=zero,
               sequence_parallel=sp, virtual_stages=2 if schedule == "interleaved" else 1)
    return (dp, pp, cp, tp), lay, dict(dropout=dropout, n_layer=max(2, 2 * pp)), dp * m


@pytest.mark.mpi
@settings(max_examples=8)
@given(data=st.data())
def test_any_cp_layout_equals_serial(world, grid_of, device, data):
    dims, lay, cfg_kw, batch = data.draw(layouts(world.size))
    grid = cp_grid(grid_of, dims)
    report(grid, f"dp{dims[0]} pp{dims[1]} cp{dims[2]} tp{dims[3]} {lay} {cfg_kw}",
           run(grid, device, dims, lay, cfg_kw, batch))
