"""Device arrays through MPI (minipar/comm/wire.py): staged through the host, or direct.

The device here is minipar.strict, the CPU stand-in for CuPy, so both paths run
on any machine: "staged" is what the PyPI MPICH gets (not CUDA-aware), "direct"
is what a CUDA-aware MPI gets (`Group(direct=True)` forces it). Every result
must equal the host reference bit for bit (small integers, exact in every
dtype), and the host <-> device bytes in `ledger.transfers` must be exactly the
staging the textbook needs: each input copied down once, each result copied up
once, a receive buffer never copied down, a broadcast root's buffer never
copied back up, and nothing at all when direct.
"""
import ctypes

import numpy as np
import pytest

from minipar import strict
from minipar.backend import Transfers, to_device, to_host
from minipar.comm import communicator
from minipar.comm.group import CommLedger, Group
from minipar.parity import agree
from minipar.comm.wire import Wire


pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

def on_device(a):
    return to_device(np.ascontiguousarray(a), strict)


# ----------------------------------------------------------------------------- serial
def test_staging_counts_each_crossing_once():
    count = Transfers()
    wire = Wire(direct=False, transfers=count)
    x = on_device(np.arange(12, dtype=np.float32).reshape(3, 4))
    buf = wire.out(x, np.float32)
    assert isinstance(buf, np.ndarray) and (count.to_host, count.to_device) == (48, 0)
    back = wire.back(buf * 2, x)
    assert isinstance(back, strict.StrictArray) and (count.to_host, count.to_device) == (48, 48)
    assert np.array_equal(to_host(back), 2 * np.arange(12, dtype=np.float32).reshape(3, 4))
    landing = wire.landing(x)                           # a receive buffer: nothing copied down
    assert isinstance(landing, np.ndarray) and count.to_host == 48
    host = np.arange(4.0)
    assert wire.out(host) is host and wire.landing(host) is host and count.to_host == 48


def test_direct_keeps_everything_on_the_device():
    count = Transfers()
    wire = Wire(direct=True, transfers=count)
    x = on_device(np.full(6, 3.0, np.float16))
    buf = wire.out(x, np.float32)                       # fp16 is reduced in fp32, on the device
    assert isinstance(buf, strict.StrictArray) and buf.dtype == np.float32
    assert isinstance(wire.landing(x[::2]), strict.StrictArray)   # strided: a fresh device buffer
    wire.write_back(x, buf * 2)
    assert np.array_equal(to_host(x), np.full(6, 6.0, np.float16))
    assert (count.to_host, count.to_device) == (0, 0)


def test_cuda_aware_asks_the_mpi_library(monkeypatch):
    class Library:
        def __init__(self, answer):
            if answer is not None:
                self.MPIX_Query_cuda_support = lambda: answer

    try:
        for answer, want in ((1, True), (0, False), (None, False)):   # None: no such function
            communicator.cuda_aware.cache_clear()
            monkeypatch.setattr(ctypes, "CDLL", lambda path, answer=answer: Library(answer))
            assert communicator.cuda_aware() is want
    finally:
        monkeypatch.undo()
        communicator.cuda_aware.cache_clear()
    assert Group.single().direct is communicator.cuda_aware()     # the default asks the real library
    forced = Group.single(direct=True)
    assert forced.wire.direct and not forced.using(algorithm="ring").wire.direct   # ring.py: host only


# ----------------------------------------------------------------------------- MPI
def staged_or_direct(group, direct):
    return Group(group.comm, group.name, CommLedger(), direct=direct)


def check(group, name, got, want, transfers, expected):
    got = to_host(got)
    ok = got.dtype == want.dtype and np.array_equal(got, want)
    moved = (transfers.to_host, transfers.to_device)
    agree(group, ok and moved == expected,
          f"{name}: got {got.ravel()[:4]} {got.dtype}, want {want.ravel()[:4]} {want.dtype}; "
          f"copies to host / to device {moved}, want {expected}")


@pytest.mark.mpi
@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_collectives_on_device_arrays(group_of, direct, dtype):
    g = staged_or_direct(group_of(4), direct)
    n, t = g.size, g.ledger.transfers
    data = np.random.default_rng(7).integers(-8, 9, size=(n, 8, 3)).astype(dtype)   # (n, 8, 3)
    mine = data[g.rank]                                                              # (8, 3)
    s = mine.nbytes

    def expect(down, up):
        return (0, 0) if direct else (down, up)

    check(g, "all_reduce", g.all_reduce(on_device(mine)), data.sum(0), t, expect(s, s))
    t.reset()
    check(g, "all_reduce avg", g.all_reduce(on_device(mine), "avg"), (data.sum(0) / n).astype(dtype),
          t, expect(s, s))
    t.reset()
    x = on_device(np.zeros((8, 6), dtype))
    x[:, ::2] = on_device(mine)                         # a strided view, reduced in place
    g.all_reduce_(x[:, ::2], "max")
    check(g, "all_reduce_ strided", x[:, ::2], data.max(0), t, expect(s, s))
    t.reset()
    y = on_device(mine)
    g.iall_reduce_(y).wait()
    check(g, "iall_reduce_", y, data.sum(0), t, expect(s, s))
    t.reset()
    block = data.sum(0)[g.rank * 2:(g.rank + 1) * 2]    # (8/n, 3): this rank's block
    check(g, "reduce_scatter", g.reduce_scatter(on_device(mine)), block, t, expect(s, s // n))
    t.reset()
    check(g, "all_gather", g.all_gather(on_device(mine)), data.reshape(n * 8, 3), t, expect(s, n * s))
    t.reset()
    z = on_device(mine)
    g.broadcast_(z, root=2)
    check(g, "broadcast_", z, data[2], t, expect(s, 0) if g.rank == 2 else expect(0, s))


@pytest.mark.mpi
@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
def test_point_to_point_on_device_arrays(group_of, direct):
    g = staged_or_direct(group_of(4), direct)
    n, t = g.size, g.ledger.transfers
    right, left = (g.rank + 1) % n, (g.rank - 1) % n
    data = np.arange(n * 5, dtype=np.float32).reshape(n, 5)       # (n, 5): row r is rank r's
    s = data[0].nbytes
    out = on_device(np.zeros(5, np.float32))
    g.sendrecv(on_device(data[g.rank]), right, out, left)
    check(g, "sendrecv", out, data[left], t, (0, 0) if direct else (s, s))
    t.reset()
    out = on_device(np.zeros(5, np.float32))
    receive = g.irecv_(out, left, tag=1)
    send = g.isend(on_device(data[g.rank]), right, tag=1)
    send.wait()
    receive.wait()
    check(g, "isend/irecv_", out, data[left], t, (0, 0) if direct else (s, s))
    t.reset()
    out = on_device(np.zeros(10, np.float32))[::2]               # a strided receive buffer
    if g.rank % 2 == 0:
        g.send(on_device(data[g.rank]), right, tag=2)
        g.recv_(out, left, tag=2)
    else:
        g.recv_(out, left, tag=2)
        g.send(on_device(data[g.rank]), right, tag=2)
    check(g, "send/recv_", out, data[left], t, (0, 0) if direct else (s, s))
