"""Group (minipar/comm/group.py): every operation against a NumPy reference, and the ledger's bytes.

Data are small integers stored as floats, so every sum is exact in every dtype
(float16 included) and results must match the reference bit for bit.
Each rank builds the whole (n, ...) stack of every rank's input from a shared
seed and takes its own row, so it can compute the reference locally.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.comm.group import CommLedger, Group, ring_bytes
from minipar.comm.request import Request
from minipar.parity import agree, assert_close

pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

DTYPES = [np.float64, np.float32, np.float16, np.int64]
FLOATS = [np.float64, np.float32, np.float16]
SIZES = [1, 2, 4, 8]


def stack_of_inputs(n, shape, dtype, seed=0):
    """(n, *shape): row r is rank r's input, small integers in `dtype`."""
    return np.random.default_rng(seed).integers(-8, 9, size=(n,) + tuple(shape)).astype(dtype)


def fresh(group):
    """The same communicator with an empty ledger of its own."""
    return group.using(ledger=CommLedger())


def check_equal(group, name, got, want):
    agree(group, got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want),
          f"{name}: got {got.dtype}{got.shape} {got.ravel()[:6]}, want {want.dtype}{want.shape} {want.ravel()[:6]}")


def data_entries(ledger):
    """The ledger's entries without control traffic (verdict flags, metadata)."""
    return [e for e in ledger.entries if e.op not in ("scalar", "object")]


def check_ledger(group, ledger, op, elements, nbytes):
    """Exactly one data entry, with these elements and bytes."""
    got = [(e.op, e.group, e.elements, e.bytes) for e in data_entries(ledger)]
    want = [(op, group.name, elements, nbytes)]
    agree(group, got == want, f"ledger {got} != {want}")


# ----------------------------------------------------------------------------- serial
def test_ring_bytes_formulas():
    assert ring_bytes("all_reduce", 800, 8) == 1400            # 2(n-1)/n * S
    assert ring_bytes("reduce_scatter", 800, 8) == 700         # (n-1)/n * S
    assert ring_bytes("all_gather", 800, 8) == 700
    assert ring_bytes("broadcast", 800, 8) == 700
    assert ring_bytes("all_reduce", 10, 3) == 40 / 3           # exact fraction, as a float
    assert ring_bytes("send", 800, 8) == ring_bytes("sendrecv", 800, 8) == 800
    assert ring_bytes("recv", 800, 8) == ring_bytes("barrier", 0, 8) == 0
    assert ring_bytes("all_reduce", 800, 1) == 0               # one rank sends nothing


def test_ledger_summary_totals_and_measure():
    ledger = CommLedger()
    ledger.record("all_reduce", "dp", "float64", 10, 140)
    with ledger.measure() as step:
        ledger.record("all_reduce", "dp", "float64", 6, 84)
        ledger.record("all_gather", "tp", "float32", 4, 8)
    assert ledger.summary() == {"dp": {"all_reduce": {"calls": 2, "elements": 16, "bytes": 224}},
                                "tp": {"all_gather": {"calls": 1, "elements": 4, "bytes": 8}}}
    assert ledger.total_bytes() == 232 and ledger.total_bytes(group="dp") == 224
    assert ledger.total_elements(op="all_gather") == 4
    assert step.total_bytes() == 92 and len(step.entries) == 2
    assert ledger.since(ledger.snapshot()).entries == ()
    assert "all_gather" in ledger.format()
    ledger.reset()
    assert ledger.entries == () and ledger.summary() == {}


def test_single_rank_group_is_identity():
    g = fresh(Group.single())
    x = np.arange(6.0).reshape(3, 2)
    assert np.array_equal(g.all_reduce(x, "avg"), x) and np.array_equal(g.all_gather(x), x)
    assert np.array_equal(g.reduce_scatter(x), x) and g.all_reduce(np.float64(2.5)).shape == ()
    assert g.ranks == (Group.world().rank,) and g.ledger.total_bytes() == 0  # n = 1: nothing sent


def test_float16_is_summed_in_float32_and_recorded_as_float16():
    g = fresh(Group.single())
    x = np.full(5, 3.0, np.float16)
    y = g.all_reduce(x)
    assert y.dtype == np.float16 and np.array_equal(y, x)
    assert g.ledger.entries[0].dtype == "float16" and g.ledger.entries[0].elements == 5


def test_non_contiguous_in_place_is_written_back():
    g = Group.single()
    x = np.arange(12.0).reshape(3, 4)
    view = x[:, ::2]                                   # (3, 2), strided
    assert g.all_reduce_(view, "max") is view and np.array_equal(x, np.arange(12.0).reshape(3, 4))
    request = g.iall_reduce_(view, "avg")
    assert isinstance(request, Request)
    request.wait()
    assert np.array_equal(x, np.arange(12.0).reshape(3, 4))


def test_clear_errors():
    g = Group.single()
    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        g.all_reduce(np.ones(2), "mean")
    with pytest.raises(ValueError, match="unknown algorithm"):
        g.using(algorithm="tree")


def test_reduce_scatter_needs_divisible_first_axis():
    g = Group.single()
    with pytest.raises(ValueError, match="not divisible by the group size"):
        g.reduce_scatter(np.float64(1.0))


# ----------------------------------------------------------------------------- MPI
@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "avg", "max"])
def test_all_reduce(group_of, n, dtype, op):
    g = fresh(group_of(n))
    if op == "avg" and dtype == np.int64:
        pytest.skip("an average of integers is not an integer")
    shape = (3, 5)
    data = stack_of_inputs(n, shape, dtype, seed=n)
    want = {"sum": data.sum(0), "avg": data.sum(0) / n, "max": data.max(0)}[op].astype(dtype)
    check_equal(g, f"all_reduce {op}", g.all_reduce(data[g.rank], op), want)
    x = data[g.rank].copy()
    check_equal(g, f"all_reduce_ {op}", g.all_reduce_(x, op), want)
    y = data[g.rank].copy()
    g.iall_reduce_(y, op).wait()
    check_equal(g, f"iall_reduce_ {op}", y, want)
    S = 15 * np.dtype(dtype).itemsize
    sent = [(e.op, e.bytes) for e in data_entries(g.ledger)]
    agree(g, sent == [("all_reduce", 2 * (n - 1) * S / n)] * 3, f"ledger {sent}")


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scatter(group_of, n, dtype):
    g = fresh(group_of(n))
    data = stack_of_inputs(n, (2 * n, 3), dtype)          # each rank's full input: (2n, 3)
    block = g.reduce_scatter(data[g.rank])               # (2, 3): this rank's block of the sum
    check_equal(g, "reduce_scatter", block, data.sum(0)[2 * g.rank:2 * g.rank + 2].astype(dtype))
    S = 6 * n * np.dtype(dtype).itemsize
    check_ledger(g, g.ledger, "reduce_scatter", 6 * n, (n - 1) * S / n)


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES + [np.int8])
def test_all_gather(group_of, n, dtype):
    g = fresh(group_of(n))
    data = stack_of_inputs(n, (2, 3), dtype)
    check_equal(g, "all_gather", g.all_gather(data[g.rank]), data.reshape(2 * n, 3))
    S = 6 * n * np.dtype(dtype).itemsize
    check_ledger(g, g.ledger, "all_gather", 6 * n, (n - 1) * S / n)


@pytest.mark.mpi
@settings(max_examples=15)
@given(first=st.integers(0, 3), rest=st.lists(st.integers(1, 3), max_size=2), dtype=st.sampled_from(FLOATS))
def test_reduce_scatter_then_all_gather_is_all_reduce(world, first, rest, dtype):
    n = world.size
    g = fresh(world)
    data = stack_of_inputs(n, (first * n, *rest), dtype, seed=first)
    rs_ag = g.all_gather(g.reduce_scatter(data[g.rank]))
    check_equal(g, "all_gather(reduce_scatter(x))", rs_ag, g.all_reduce(data[g.rank]))
    volume = g.ledger.total_bytes(op="reduce_scatter") + g.ledger.total_bytes(op="all_gather")
    agree(g, volume == g.ledger.total_bytes(op="all_reduce"), "RS + AG moves what all-reduce moves")


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
def test_broadcast_from_last_rank(group_of, n):
    g = fresh(group_of(n))
    data = stack_of_inputs(n, (4,), np.float16)
    check_equal(g, "broadcast_", g.broadcast_(data[g.rank].copy(), root=n - 1), data[n - 1])
    check_ledger(g, g.ledger, "broadcast", 4, (n - 1) * 8 / n)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4, 8])
def test_point_to_point_shift(group_of, n):
    """Every rank passes its row to the right: send/recv, isend/irecv_ and sendrecv agree."""
    g = fresh(group_of(n))
    data = stack_of_inputs(n, (3,), np.float32)
    right, left = (g.rank + 1) % n, (g.rank - 1) % n
    got = np.empty(3, np.float32)
    g.sendrecv(data[g.rank], right, got, left, tag=1)
    check_equal(g, "sendrecv", got, data[left])
    got = np.empty(3, np.float32)
    requests = [g.irecv_(got, left, tag=2), g.isend(data[g.rank], right, tag=2)]
    Request.wait_all(requests)
    check_equal(g, "isend/irecv_", got, data[left])
    strided = np.zeros((3, 2), np.float32)[:, 0]        # a non-contiguous receive buffer
    if g.rank % 2 == 0:                                  # even ranks send first: no deadlock
        g.send(data[g.rank], right, tag=3)
        g.recv_(strided, left, tag=3)
    else:
        g.recv_(strided, left, tag=3)
        g.send(data[g.rank], right, tag=3)
    check_equal(g, "send/recv_", strided.copy(), data[left])
    sent = {e.op: e.bytes for e in data_entries(g.ledger)}
    agree(g, sent == {"sendrecv": 12, "irecv": 0, "isend": 12, "send": 12, "recv": 0}, f"{sent}")


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4, 8])
def test_split_ranks_objects_and_scalars(world, group_of, n):
    g = group_of(n)
    block = world.rank // n
    agree(world, g.ranks == tuple(range(block * n, block * n + n)) and g.world_rank == world.rank,
          f"block ranks {g.ranks}")
    evens = g.split(color=0 if g.rank % 2 == 0 else Group.UNDEFINED, name="evens")
    agree(world, (evens is None) == (g.rank % 2 == 1), "UNDEFINED color gives None")
    if evens is not None:
        agree(evens, evens.size == n // 2 and evens.rank == g.rank // 2, f"{evens}")
    names = g.allgather_object(f"r{g.rank}")
    agree(world, names == [f"r{i}" for i in range(n)] and g.bcast_object(g.rank, root=n - 1) == n - 1,
          f"{names}")
    agree(world, g.sum_(g.rank) == n * (n - 1) // 2 and g.max_(float(g.rank)) == n - 1.0
          and g.max_(g.rank == 0) == 1, "scalars")
    g.barrier()


@pytest.mark.mpi
def test_float16_average_rounds_once(world):
    """fp16 mean of values that overflow fp16 when summed in fp16: fine in fp32."""
    x = np.full(4, 60000.0, np.float16)          # near the fp16 max 65504
    assert_close(world, "fp16 avg", world.all_reduce(x, "avg"), x, rtol=0)


@pytest.mark.gpu
def test_cupy_arrays_go_direct_or_are_staged():
    """With CuPy: results stay CuPy arrays; the host copies are x.nbytes each way for an
    all-reduce unless the MPI library is CUDA-aware (then none)."""
    cupy = pytest.importorskip("cupy")
    g = fresh(Group.single())
    x = cupy.arange(6, dtype=cupy.float32)
    y = g.all_reduce(x)
    assert isinstance(y, cupy.ndarray) and bool((y == x).all())
    moved = (g.ledger.transfers.to_host, g.ledger.transfers.to_device)
    assert moved == ((0, 0) if g.wire.direct else (x.nbytes, x.nbytes)), moved
    g.all_reduce_(x[::2], "max")
    assert isinstance(g.all_gather(x), cupy.ndarray)
