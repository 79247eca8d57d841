"""Tensor parallelism (minipar/parallel/tensor/megatron.py, sequence.py, vocab.py).

* the conjugate operators f, g and their sequence-parallel counterparts, value by value;
* the vocab-parallel loss and argmax against the full-logits ones;
* one layer, then whole training runs (hypothesis: tp in {2, 4, 8} as the world allows,
  with dp, SP on/off, tied/untied, dropout, micro-batches, both collective algorithms)
  in lockstep with the serial Engine: loss, grads, params, Adam m and v after each step;
* dropout masks: the masks the ranks draw, assembled, are the serial masks;
* communication from the ledger: per layer and micro-batch exactly 2 + 2 all-reduces of
  b*s*h (SP: 4 all-gathers + 4 reduce-scatters), 8*b*s*h*(t-1)/t elements sent, and the
  embedding / head / loss / SP-gradient reductions counted on their own;
* memory: parameter bytes per rank = split part / t + replicated part; activation bytes
  with and without SP.
"""
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import ops, parity
from minipar.autograd import Tensor, track_saved
from minipar.comm.group import Group
from minipar.parity import agree, assert_close
from minipar.engine import Engine, Layout, OptimConfig
from minipar.lockstep import lockstep
from minipar.formulas import tp_comm_elements
from minipar.memory import MemoryLedger
from minipar.nn import GPT, DropoutKey
from minipar.parallel.tensor.sequence import GatherSeq, ReduceScatterSeq, seq_slice
from minipar.parallel.tensor.megatron import CopyToTP, ReduceFromTP, shard_tensor_parallel, split_heads
from minipar.parallel.tensor.vocab import vocab_parallel_argmax, vocab_parallel_cross_entropy

from helpers import TASK, TP_OPTIM, TP_RUN, TP_SEED, tp_config

pytestmark = pytest.mark.tp

WORLD = Group.world().size
TP_SIZES = [t for t in (2, 4, 8) if t <= WORLD and WORLD % t == 0]


def serial_and_tp(cfg, group, sequence_parallel):
    """(serial GPT, this rank's tensor-parallel GPT), both from the same seed."""
    return GPT(cfg, TP_SEED), shard_tensor_parallel(GPT(cfg, TP_SEED), group, sequence_parallel)


def biggest_tp_group(group_of):
    if not TP_SIZES:
        pytest.skip("tensor parallelism needs at least 2 ranks")
    return group_of(TP_SIZES[-1])


# ----------------------------------------------------------------------------- serial
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_whole_heads_are_one_contiguous_block_of_columns(tp):
    """Head-major packing (C, H*3*D): rank t's whole heads ARE columns [t*3C/tp, (t+1)*3C/tp)."""
    n_head, head_dim, c = 8, 3, 5
    w = np.arange(c * n_head * 3 * head_dim, dtype=float).reshape(c, -1)    # (C, H*3*D)
    width = w.shape[1] // tp
    for rank in range(tp):
        mine = split_heads(w, n_head, SimpleNamespace(rank=rank, size=tp))
        assert np.array_equal(mine, w[:, rank * width:(rank + 1) * width])


@settings(max_examples=6)
@given(seed=st.integers(0, 2 ** 16), sp=st.booleans(), tied=st.booleans(), dropout=st.sampled_from([0.0, 0.2]))
def test_one_rank_tensor_parallel_model_is_the_serial_model(seed, sp, tied, dropout):
    """tp = 1 runs every TP code path (vocab-parallel loss, f, g, SP gathers) over one rank."""
    cfg = tp_config(tp=1, tied_embeddings=tied, dropout=dropout)
    serial, local = serial_and_tp(cfg, Group.single(), sp)
    x, y = TASK.batch(seed, np.arange(4))
    key = DropoutKey(TP_SEED, seed, np.arange(4))
    want, got = serial.loss(x, y, key), local.loss(x, y, key)
    want.backward()
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    theirs = dict(serial.named_parameters())
    for name, p in local.named_parameters():
        assert parity.rel_err(p.grad, theirs[name].grad) <= 1e-12, name
    logits = serial.eval()(x)
    assert np.array_equal(local.eval().predict(local(x)), serial.predict(logits))


# ----------------------------------------------------------------------------- operators
def rows_of_ranks(n, shape, seed=0):
    """(n, *shape) small integers as floats: row r is rank r's data; every sum is exact."""
    return np.random.default_rng(seed).integers(-8, 9, size=(n,) + shape).astype(np.float64)


@pytest.mark.mpi
def test_f_g_and_their_sequence_parallel_counterparts(group_of):
    group = biggest_tp_group(group_of)
    n, r, (B, T, C) = group.size, group.rank, (2, 2 * group.size, 3)
    xs, gs = rows_of_ranks(n, (B, T, C), 1), rows_of_ranks(n, (B, T, C), 2)
    mine, chunk = seq_slice(T // n, r), lambda a, rank: a[:, seq_slice(T // n, rank)]
    cases = {  # name: (op, input, upstream grad, expected output, expected input grad, ledger)
        "f": (CopyToTP, xs[r], gs[r], xs[r], gs.sum(0), [("all_reduce", B * T * C)]),
        "g": (ReduceFromTP, xs[r], gs[r], xs.sum(0), gs[r], [("all_reduce", B * T * C)]),
        "all-gather T": (GatherSeq, chunk(xs[r], r), gs[r],
                         np.concatenate([chunk(xs[q], q) for q in range(n)], axis=1),
                         gs.sum(0)[:, mine], [("all_gather", B * T * C), ("reduce_scatter", B * T * C)]),
        "reduce-scatter T": (ReduceScatterSeq, xs[r], chunk(gs[r], r), xs.sum(0)[:, mine],
                             np.concatenate([chunk(gs[q], q) for q in range(n)], axis=1),
                             [("reduce_scatter", B * T * C), ("all_gather", B * T * C)]),
    }
    for name, (fn, x, g, want_y, want_dx, want_ops) in cases.items():
        x = Tensor(x.copy(), requires_grad=True)
        with group.ledger.measure() as calls:
            y = fn.apply(x, group=group)
            y.backward(g)
        ops_seen = [(e.op, e.elements) for e in calls.entries if e.group == group.name]
        agree(group, np.array_equal(y.data, want_y) and np.array_equal(x.grad, want_dx),
              f"{name}: forward or backward differs from the reference")
        agree(group, ops_seen == want_ops, f"{name}: communicated {ops_seen}, expected {want_ops}")


@pytest.mark.mpi
@settings(max_examples=6)
@given(seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1.0, 1e3]), ties=st.booleans())
def test_vocab_parallel_loss_and_argmax_equal_the_full_logits_ones(group_of, seed, scale, ties):
    """Large logits (scale 1e3) overflow exp without the global max; ties check the argmax order."""
    group = biggest_tp_group(group_of)
    rng, V = np.random.default_rng(seed), 4 * group.size
    z = rng.standard_normal((2, 5, V)) * scale                               # (B, T, V) full, same everywhere
    if ties:
        z = np.round(z / scale)                                              # few distinct values
    y = rng.integers(-1, V, (2, 5))                                          # -1: ignored
    cut = slice(group.rank * 4, (group.rank + 1) * 4)
    full, part = Tensor(z.copy(), requires_grad=True), Tensor(z[..., cut].copy(), requires_grad=True)
    want, got = ops.cross_entropy(full, y), vocab_parallel_cross_entropy(part, y, group, cut.start)
    want.backward()
    got.backward()
    assert_close(group, "loss", got.data, want.data, 1e-13)
    assert_close(group, "dlogits", part.grad, full.grad[..., cut], 1e-13)
    pred = vocab_parallel_argmax(z[..., cut], group, cut.start)
    agree(group, np.array_equal(pred, z.argmax(-1)), f"argmax {pred} != {z.argmax(-1)}")


# ----------------------------------------------------------------------------- one layer
@pytest.mark.mpi
@pytest.mark.parametrize("sp", [False, True])
def test_one_block_equals_the_serial_block(group_of, sp):
    group = biggest_tp_group(group_of)
    cfg = tp_config(group.size, dropout=0.1)
    serial, local = serial_and_tp(cfg, group, sp)
    rng, key = np.random.default_rng(0), DropoutKey(TP_SEED, 0, np.arange(2))
    x, g = rng.standard_normal((2, cfg.seq_len, cfg.d_model)), rng.standard_normal((2, cfg.seq_len, cfg.d_model))
    mine = seq_slice(cfg.seq_len // group.size, group.rank) if sp else slice(None)
    xs, xl = Tensor(x, requires_grad=True), Tensor(x[:, mine].copy(), requires_grad=True)
    ys, yl = serial.blocks[0](xs, key), local.blocks[0](xl, key)
    ys.backward(g)
    yl.backward(g[:, mine].copy())
    assert_close(group, "block output", yl.data, ys.data[:, mine], 1e-12)
    assert_close(group, "d input", xl.grad, xs.grad[:, mine], 1e-12)
    theirs = dict(serial.named_parameters())
    for name, p in local.blocks[0].named_parameters("blocks.0."):
        assert_close(group, f"grad of {name}", p.grad, p.spec.take(theirs[name].grad), 1e-12)


# ----------------------------------------------------------------------------- the whole run
@st.composite
def tp_runs(draw):
    """(config, layout, steps, algorithm): tp and dp as the world allows, everything else small."""
    tp = draw(st.sampled_from(TP_SIZES))
    dp = draw(st.sampled_from([d for d in (1, 2, 4) if d * tp <= WORLD and WORLD % (d * tp) == 0]))
    n_head = draw(st.sampled_from([h for h in (2, 4, 8) if h % tp == 0]))
    cfg = tp_config(tp, n_head=n_head, d_model=n_head * draw(st.sampled_from([2, 4])),
                 vocab_size=draw(st.sampled_from([16, 24])), n_layer=draw(st.sampled_from([1, 2])),
                 tied_embeddings=draw(st.booleans()), dropout=draw(st.sampled_from([0.0, 0.1])))
    layout = Layout(dp=dp, tp=tp, sequence_parallel=draw(st.booleans()),
                    micro_batches=draw(st.sampled_from([1, 2])))
    return cfg, layout, draw(st.sampled_from([2, 3])), draw(st.sampled_from(["mpi", "ring"]))


@pytest.mark.mpi
@settings(max_examples=10)
@given(run=tp_runs())
def test_tensor_parallel_training_equals_serial(grid_of, device, run):
    cfg, layout, steps, algorithm = run
    if not TP_SIZES:
        pytest.skip("tensor parallelism needs at least 2 ranks")
    grid = grid_of(layout.dp, tp=layout.tp, algorithm=algorithm)
    worst = lockstep(cfg, layout, steps=steps, grid=grid, device=device, **TP_RUN).worst
    if grid.world.rank == 0:                           # shown with pytest -s
        print(f"\n  max rel err {worst:.2e}: {algorithm}, {layout}, {cfg}")


@pytest.mark.mpi
@pytest.mark.parametrize("sp,tied", [(False, True), (True, False)])
def test_dropout_run_equals_serial_dropout_run(grid_of, device, sp, tied):
    tp = TP_SIZES[-1] if TP_SIZES else pytest.skip("needs 2 ranks")
    layout = Layout(tp=tp, sequence_parallel=sp, micro_batches=2)
    lockstep(tp_config(tp, dropout=0.2, tied_embeddings=tied), layout, steps=2, grid=grid_of(tp=tp),
             device=device, **TP_RUN)


@pytest.mark.mpi
def test_float32_training_is_within_the_stated_tolerance(grid_of, device):
    """float32: only the reduction order differs; Adam eps 1e-6 as in the DP tests (the key bias
    has an exactly-zero gradient whose rounding noise Adam would otherwise amplify)."""
    tp = TP_SIZES[-1] if TP_SIZES else pytest.skip("needs 2 ranks")
    optim = OptimConfig(lr=TP_OPTIM.lr, weight_decay=0.1, max_norm=TP_OPTIM.max_norm, eps=1e-6)
    run = {**TP_RUN, "optim": optim, "tol": parity.TOLERANCE["fp32"]}
    lockstep(tp_config(tp, precision="fp32"), Layout(tp=tp, sequence_parallel=True), steps=2,
             grid=grid_of(tp=tp), device=device, **run)


# ----------------------------------------------------------------------------- dropout masks
@pytest.mark.mpi
@pytest.mark.parametrize("sp", [False, True])
def test_dropout_masks_assembled_over_tp_are_the_serial_masks(group_of, monkeypatch, sp):
    group = biggest_tp_group(group_of)
    n, masks = group.size, []
    dropout, attention = ops.dropout, ops.causal_attention

    def record_dropout(x, keep, p):
        masks.append(("residual", keep))
        return dropout(x, keep, p)

    def record_attention(qkv, n_head, keep=None, p=0.0):
        masks.append(("attention", keep))
        return attention(qkv, n_head, keep, p)
    monkeypatch.setattr(ops, "dropout", record_dropout)
    monkeypatch.setattr(ops, "causal_attention", record_attention)
    serial, local = serial_and_tp(tp_config(n, dropout=0.3), group, sp)
    x, _ = TASK.batch(0, np.arange(3))
    key = DropoutKey(TP_SEED, 1, np.arange(3))
    serial(x, key)
    want, masks[:] = list(masks), []
    local(x, key)
    agree(group, [k for k, _ in masks] == [k for k, _ in want], "different dropout sites were used")
    for i, ((kind, mine), (_, serial_mask)) in enumerate(zip(masks, want)):
        axis = 1 if kind == "attention" or sp else None     # heads (B, H/tp, T, T) or T (B, T/tp, C)
        if axis is None:
            whole = mine                                    # replicated activation: the whole mask
        else:
            front = np.moveaxis(mine, axis, 0)               # (H/tp, ...) or (T/tp, ...)
            # all-gather over tp of each rank's piece of the mask: the serial mask's size
            whole = np.moveaxis(group.all_gather(front.astype(np.uint8)), 0, axis).astype(bool)
        agree(group, np.array_equal(whole, serial_mask), f"mask {i} ({kind}) differs from the serial mask")
    agree(group, len(masks) == 1 + 3 * 2, f"{len(masks)} masks drawn, expected 1 + 3 per layer")


# ----------------------------------------------------------------------------- communication
def expected_model_calls(cfg, b, s, sp):
    """Per micro-batch, the tp-group calls OUTSIDE the layers: Counter of (op, elements)."""
    bsh, N, C = b * s * cfg.d_model, b * s, cfg.d_model
    loss = Counter({("all_reduce", N): 1, ("all_reduce", 2 * N): 1})        # row max; [sum exp, z_y]
    if not sp:      # embedding: g fwd; head: f bwd
        return loss + Counter({("all_reduce", bsh): 2})
    return loss + Counter({("reduce_scatter", bsh): 2,      # embedding fwd; head gather's bwd
                           ("all_gather", bsh): 3,          # head fwd and its re-gather; embedding bwd
                           ("all_reduce", cfg.seq_len * C): 1,   # wpe grad
                           ("all_reduce", 2 * C): 1})       # ln_f grads


def expected_layer_calls(cfg, b, s, sp):
    """Per layer and micro-batch: (forward, backward) Counters of (op, elements)."""
    bsh, C = b * s * cfg.d_model, cfg.d_model
    if not sp:
        return Counter({("all_reduce", bsh): 2}), Counter({("all_reduce", bsh): 2})
    pair = Counter({("all_gather", bsh): 2, ("reduce_scatter", bsh): 2})
    return pair, pair + Counter({("all_gather", bsh): 2,                # re-gathers of c_attn, fc inputs
                                 ("all_reduce", 2 * C): 2, ("all_reduce", C): 2})   # LN, bias grads


def calls(window, group):
    return Counter((e.op, e.elements) for e in window.entries if e.group == group.name)


@pytest.mark.mpi
@pytest.mark.parametrize("sp", [False, True])
def test_one_layer_communicates_exactly_2_plus_2_all_reduces(group_of, sp):
    group = biggest_tp_group(group_of)
    t, cfg = group.size, tp_config(group.size)
    b, s, h = 2, cfg.seq_len, cfg.d_model
    block = serial_and_tp(cfg, group, sp)[1].blocks[0]
    x = Tensor(np.random.default_rng(0).standard_normal((b, s // t if sp else s, h)), requires_grad=True)
    with group.ledger.measure() as fwd:
        y = block(x)
    with group.ledger.measure() as bwd:
        y.backward(np.ones_like(y.data))
    want_fwd, want_bwd = expected_layer_calls(cfg, b, s, sp)
    agree(group, calls(fwd, group) == want_fwd, f"forward: {calls(fwd, group)} != {want_fwd}")
    agree(group, calls(bwd, group) == want_bwd, f"backward: {calls(bwd, group)} != {want_bwd}")
    core = [e for w in (fwd, bwd) for e in w.entries if e.elements == b * s * h]
    sent = sum(e.bytes for e in core) / x.data.itemsize
    agree(group, len(core) == (4 if not sp else 10) and sent == tp_comm_elements(b, s, h, t, sequence_parallel=sp),
          f"{len(core)} calls of b*s*h sent {sent} elements; 8bsh(t-1)/t = {tp_comm_elements(b, s, h, t)}")


@pytest.mark.mpi
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_a_training_step_communicates_layers_plus_embedding_head_and_loss(grid_of, device, sp, tied):
    tp = TP_SIZES[-1] if TP_SIZES else pytest.skip("needs 2 ranks")
    grid, micro, b = grid_of(tp=tp), 2, 2
    cfg = tp_config(tp, tied_embeddings=tied)
    engine = Engine(cfg, Layout(tp=tp, sequence_parallel=sp, micro_batches=micro), TP_OPTIM, seed=TP_SEED, grid=grid,
                    device=device)
    with grid.tp_group.ledger.measure() as step:
        engine.train_step(0, TASK, micro * b)
    fwd, bwd = expected_layer_calls(cfg, b, cfg.seq_len, sp)
    per_micro = Counter({k: v * cfg.n_layer for k, v in (fwd + bwd).items()}) + expected_model_calls(
        cfg, b, cfg.seq_len, sp)
    want = Counter({k: v * micro for k, v in per_micro.items()})
    got = calls(step, grid.tp_group)
    agree(grid.world, got == want, f"tp calls per step {dict(got)} != {dict(want)}")


# ----------------------------------------------------------------------------- memory
def split_and_replicated(cfg):
    """(elements split over tp, elements every tp rank holds), counted from the architecture."""
    C, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layer
    per_layer = (3 * C * C + 3 * C) + C * C + (4 * C * C + 4 * C) + 4 * C * C   # c_attn, c_proj.W, fc, proj.W
    split = L * per_layer + V * C + (0 if cfg.tied_embeddings else C * V)       # + wte (+ lm_head)
    replicated = L * (4 * C + C + C) + 2 * C + cfg.seq_len * C   # ln_1, ln_2, c_proj.b, proj.b; ln_f; wpe
    return split, replicated


@pytest.mark.mpi
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_bytes_per_rank_are_split_over_t_plus_replicated(grid_of, device, tied):
    tp = TP_SIZES[-1] if TP_SIZES else pytest.skip("needs 2 ranks")
    grid, cfg = grid_of(tp=tp), tp_config(tp, tied_embeddings=tied)
    engine = Engine(cfg, Layout(tp=tp), TP_OPTIM, grid=grid, device=device)
    split, replicated = split_and_replicated(cfg)
    itemsize = np.dtype(np.float64).itemsize
    held = engine.ledger.current("param")
    agree(grid.world, split + replicated == GPT(cfg).num_params(), "the count misses parameters")
    agree(grid.world, held == (split // tp + replicated) * itemsize,
          f"rank holds {held} parameter bytes, expected ({split}/{tp} + {replicated}) * {itemsize}")
    owners = sum(p.spec.norm_owner * p.data.size for p in engine.params if p.spec.axis is None)
    agree(grid.world, owners == (replicated if grid.tp_rank == 0 else 0), "norm_owner of replicas")


def activation_peak(model, x, y, key):
    """Peak saved-activation bytes over one forward + backward, and what is left after it."""
    with track_saved(MemoryLedger()) as ledger:
        model.loss(x, y, key).backward()
    return ledger.peak("activation"), ledger.current("activation")


@pytest.mark.mpi
def test_sequence_parallelism_shrinks_activation_memory(group_of):
    group = biggest_tp_group(group_of)
    cfg = tp_config(group.size, dropout=0.1, n_layer=1)
    x, y = TASK.batch(0, np.arange(4))
    key = DropoutKey(TP_SEED, 0, np.arange(4))
    serial = activation_peak(GPT(cfg, TP_SEED), x, y, key)
    tp = activation_peak(shard_tensor_parallel(GPT(cfg, TP_SEED), group, False), x, y, key)
    sp = activation_peak(shard_tensor_parallel(GPT(cfg, TP_SEED), group, True), x, y, key)
    if group.rank == 0:                                # shown with pytest -s
        print(f"\n  activation bytes per rank, tp={group.size}: serial {serial[0]}, TP {tp[0]}, TP+SP {sp[0]}")
    agree(group, serial[1] == tp[1] == sp[1] == 0, "saved activations were not all released")
    agree(group, sp[0] < tp[0] < serial[0], f"peaks serial {serial[0]}, TP {tp[0]}, TP+SP {sp[0]}")
    # Korthikanti et al.: with SP nothing a layer saves is replicated (GatherLinear keeps the
    # c_attn / fc inputs as T/t chunks), so each rank holds exactly 1/t of the serial bytes
    agree(group, sp[0] * group.size == serial[0], f"TP+SP peak {sp[0]} x t != serial {serial[0]}")


# ----------------------------------------------------------------------------- refusals
@pytest.mark.mpi
@pytest.mark.parametrize("field,cfg", [("n_head", dict(n_head=3, d_model=12)), ("vocab_size", dict(vocab_size=15))])
def test_uneven_split_is_refused_on_every_rank_before_any_collective(group_of, field, cfg):
    group = group_of(2) if WORLD >= 2 else pytest.skip("needs 2 ranks")
    with group.ledger.measure() as window:
        try:
            shard_tensor_parallel(GPT(tp_config(2, **cfg)), group, False)
            error = None
        except ValueError as err:
            error = str(err)
    agree(group, error is not None and field in error, f"expected a ValueError naming {field}, got {error}")
    agree(group, window.entries == (), f"communicated before refusing: {window.entries}")


@pytest.mark.mpi
def test_sequence_parallelism_needs_T_divisible_by_tp(group_of):
    group = biggest_tp_group(group_of)
    model = shard_tensor_parallel(GPT(tp_config(group.size)), group, True)
    x, _ = TASK.batch(0, np.arange(2))
    with pytest.raises(ValueError, match="not divisible"):     # raised alike on every rank: same T
        model(x[:, :-1])
