"""ring.py: the Sendrecv ring equals MPI's own collectives, in results and in ledger bytes,
and each step holds the partial sums its docstring promises."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.comm import ring
from minipar.comm.group import CommLedger, Group
from minipar.parity import VerdictError, agree, assert_close

pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

SIZES = [1, 2, 4, 8]


def both_algorithms(group):
    """The same communicator twice, each with its own ledger: ("mpi", "ring")."""
    return group.using(ledger=CommLedger(), algorithm="mpi"), group.using(ledger=CommLedger(), algorithm="ring")


def data_ledger(group):
    return [(e.op, e.group, e.dtype, e.elements, e.bytes) for e in group.ledger.entries
            if e.op not in ("scalar", "object")]


def rank_inputs(n, size, integer_valued, seed):
    """(n, size) float64: row r is rank r's buffer."""
    rng = np.random.default_rng(seed)
    return rng.integers(-50, 50, (n, size)).astype(np.float64) if integer_valued else rng.normal(size=(n, size))


# ----------------------------------------------------------------------------- serial
def test_one_rank_ring_is_identity():
    g = Group.single(algorithm="ring")
    x = np.arange(7.0)
    assert np.array_equal(g.all_reduce(x), x) and np.array_equal(g.all_gather(x), x)
    assert np.array_equal(ring.ring_all_reduce_(g, x.copy()), x)


def test_chunks_must_divide():
    with pytest.raises(ValueError, match="divisible into 3 chunks"):
        ring._chunks(type("G", (), {"size": 3})(), np.zeros(7))


# ----------------------------------------------------------------------------- MPI
@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@settings(max_examples=12)
@given(size=st.integers(0, 40), integer_valued=st.booleans(), op=st.sampled_from(["sum", "avg", "max"]))
def test_ring_all_reduce_equals_mpi(group_of, n, size, integer_valued, op):
    mpi, ring_ = both_algorithms(group_of(n))
    x = rank_inputs(n, size, integer_valued, seed=size)[mpi.rank]
    want, got = mpi.all_reduce(x, op), ring_.all_reduce(x, op)
    if integer_valued:  # exact: sums of integers do not depend on the order
        agree(mpi, np.array_equal(got, want), f"ring {got[:4]} != mpi {want[:4]}")
    else:               # only the order of the additions differs
        assert_close(mpi, "ring all_reduce", got, want, rtol=1e-12)
    agree(mpi, data_ledger(ring_) == data_ledger(mpi), f"{data_ledger(ring_)} != {data_ledger(mpi)}")


@pytest.mark.mpi
@pytest.mark.parametrize("n", SIZES)
@settings(max_examples=10)
@given(blocks=st.integers(0, 6), width=st.integers(1, 3), integer_valued=st.booleans())
def test_ring_reduce_scatter_and_all_gather_equal_mpi(group_of, n, blocks, width, integer_valued):
    mpi, ring_ = both_algorithms(group_of(n))
    x = rank_inputs(n, n * blocks * width, integer_valued, seed=blocks)[mpi.rank].reshape(n * blocks, width)
    want, got = mpi.reduce_scatter(x), ring_.reduce_scatter(x)     # (blocks, width)
    assert_close(mpi, "ring reduce_scatter", got, want, rtol=0 if integer_valued else 1e-12)
    agree(mpi, got.shape == (blocks, width), f"shape {got.shape}")
    want, got = mpi.all_gather(x), ring_.all_gather(x)             # (n * n * blocks, width)
    agree(mpi, np.array_equal(got, want), "ring all_gather differs")
    agree(mpi, data_ledger(ring_) == data_ledger(mpi), f"{data_ledger(ring_)} != {data_ledger(mpi)}")


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_ring_keeps_dtype_policy(world, dtype):
    """float16 is summed in float32 by both algorithms: the ring result is exactly MPI's."""
    mpi, ring_ = both_algorithms(world)
    x = np.full(10, 0.1 * (world.rank + 1), dtype)
    got, want = ring_.all_reduce(x), mpi.all_reduce(x)
    agree(world, got.dtype == dtype, f"dtype {got.dtype}")
    assert_close(world, "ring fp all_reduce", got, want, rtol=1e-6)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4, 8])
def test_each_step_holds_the_promised_partial_sums(group_of, n):
    """Rank r contributes 2**r to every element, so a value's bits spell who was added in.
    After reduce-scatter step s, chunk (r-s-2) mod n holds ranks r-s-1 ... r; after all-gather
    step s chunks r-s-1 ... r are complete."""
    g = group_of(n)
    r = g.rank
    problems = []

    def expect(phase, step, chunks):
        if phase == "reduce-scatter":
            j = (r - step - 2) % n
            want = sum(2.0 ** ((r - k) % n) for k in range(step + 2))
            if not np.all(chunks[j] == want):
                problems.append(f"{phase} step {step}: chunk {j} = {chunks[j][0]}, want {want}")
        else:
            done = [(r - k) % n for k in range(step + 2)]
            if not np.all(chunks[done] == 2.0 ** n - 1):
                problems.append(f"{phase} step {step}: chunks {done} not complete: {chunks[:, 0]}")

    x = np.full(3 * n, 2.0 ** r)
    ring.ring_all_reduce_(g, x, on_step=expect)
    agree(g, not problems and np.all(x == 2.0 ** n - 1), "; ".join(problems) or f"result {x}")


@pytest.mark.mpi
def test_catches_a_ring_that_overwrites_instead_of_adding(world):
    """Bug zoo: the arriving partial sum replaces this rank's chunk instead of being added."""
    x = np.arange(16.0) + world.rank
    got = x.copy()
    ring.ring_all_reduce_(world, got, ufunc=lambda mine, arriving, out: np.copyto(out, arriving))
    with pytest.raises(VerdictError, match="max rel err"):
        assert_close(world, "buggy ring all_reduce", got, world.all_reduce(x), rtol=1e-12)
