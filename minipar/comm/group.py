"""Group: the only door to MPI. Every byte minipar moves goes through here.

A `Group` wraps one MPI communicator: the whole job (`Group.world()`) or a
sub-group made by `split` (the tp, pp, dp groups of a ProcessGrid). Its
methods take and return arrays and call mpi4py's uppercase buffer methods
(Allreduce, Reduce_scatter_block, Allgather, Bcast, Send/Recv, Sendrecv, and
Alltoall / Alltoallv for expert parallelism's token dispatch).

Each call is recorded in the group's `CommLedger` (comm/ledger.py): op, group,
dtype, elements and the bytes this rank sends under a ring algorithm.

Arrays
------
comm/wire.py turns arrays into MPI buffers: host arrays as they are, device
(CuPy) arrays either handed to a CUDA-aware MPI directly or staged through host
memory, the bytes of each crossing counted in `ledger.transfers`. float16 is
reduced in float32 and cast back; the ledger records the logical float16.
Data that is only moved, not reduced, travels as raw bytes (a uint8 view), so
every dtype works.
"""
import ctypes
import functools
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from minipar.comm import ring
from minipar.comm.ledger import CommEntry, CommLedger, ring_bytes  # noqa: F401  (re-exported)
from minipar.comm.wire import Wire, mpi_view, raw, wire_dtype

_MPI_OPS = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX}
_UFUNCS = {"sum": np.add, "avg": np.add, "max": np.maximum}
RING_TAG = 32000  # tag of ring.py's Sendrecv steps; user point-to-point tags stay below it


@functools.lru_cache(maxsize=None)
def cuda_aware():
    """True when the MPI library reads and writes GPU memory itself: its
    MPIX_Query_cuda_support() (exported by MPICH >= 4.1 and Open MPI) returns 1.
    Asked once per process, after MPI_Init; any library without the call counts as not aware."""
    try:
        return bool(ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support())
    except (OSError, AttributeError):
        return False


def _check_op(op):
    if op not in _MPI_OPS:
        raise ValueError(f"unknown reduction {op!r}: expected 'sum', 'avg' or 'max'")


class Request:
    """A pending non-blocking call; `wait()` completes it (and finishes staging / averaging)."""

    def __init__(self, mpi_request=None, finish=None, keep=None):
        self._request, self._finish, self._keep = mpi_request, finish, keep

    def _complete(self):
        self._request, finish, self._finish, self._keep = None, self._finish, None, None
        if finish is not None:
            finish()

    def test(self):
        """True once complete (then finished as by wait); never blocks."""
        if self._request is not None and self._request.Test():
            self._complete()
        return self._request is None

    def wait(self):
        if self._request is not None:
            self._request.Wait()
            self._complete()

    @staticmethod
    def wait_all(requests):
        for request in requests:
            request.wait()


def _timed(method):
    """Stamp the ledger entries a Group call records with the call's wall-clock span, when
    the ledger has a clock (comm/ledger.py; the --trace timeline's communication events)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        ledger = self.ledger
        if ledger.clock is None:
            return method(self, *args, **kwargs)
        mark, start = ledger.snapshot(), ledger.clock()
        try:
            return method(self, *args, **kwargs)
        finally:
            ledger.stamp(mark, start, ledger.clock())
    return call


# ----------------------------------------------------------------------------- group
class Group:
    """A set of ranks that communicate: rank, size, ranks (their world ranks), ledger, algorithm."""

    UNDEFINED = MPI.UNDEFINED  # split color for ranks that join no sub-group

    def __init__(self, comm, name, ledger=None, algorithm="mpi", direct=None):
        if algorithm not in ("mpi", "ring"):
            raise ValueError(f"unknown algorithm {algorithm!r}: expected 'mpi' or 'ring'")
        self.comm, self.name, self.algorithm = comm, name, algorithm
        self.ledger = CommLedger() if ledger is None else ledger
        # device arrays go to MPI directly only if it is CUDA-aware (ring.py works on host buffers)
        self.direct = cuda_aware() if direct is None else direct
        self.wire = Wire(self.direct and algorithm == "mpi", self.ledger.transfers)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        members, everyone = comm.Get_group(), MPI.COMM_WORLD.Get_group()
        self.ranks = tuple(members.Translate_ranks(list(range(self.size)), everyone))
        members.Free()
        everyone.Free()

    @classmethod
    def world(cls, ledger=None, algorithm="mpi", direct=None):
        """Every rank of the job (MPI.COMM_WORLD), named "world". `direct`: hand device arrays
        to MPI without staging (default: whether the MPI library is CUDA-aware)."""
        return cls(MPI.COMM_WORLD, "world", ledger, algorithm, direct)

    @classmethod
    def single(cls, ledger=None, algorithm="mpi", direct=None):
        """Just this rank (MPI.COMM_SELF): serial code paths through the same API."""
        return cls(MPI.COMM_SELF, "self", ledger, algorithm, direct)

    @property
    def world_rank(self):
        return self.ranks[self.rank]

    def __repr__(self):
        return f"Group({self.name!r}, rank {self.rank} of {self.size}, world ranks {list(self.ranks)})"

    def using(self, ledger=None, algorithm=None, name=None):
        """The same communicator with another ledger / algorithm / name (no MPI call)."""
        return Group(self.comm, name or self.name, self.ledger if ledger is None else ledger,
                     algorithm or self.algorithm, self.direct)

    def split(self, color, key=None, name="split"):
        """Sub-group of the ranks passing the same color, ordered by key (default: rank).
        Collective over this group; color Group.UNDEFINED returns None."""
        comm = self.comm.Split(color, self.rank if key is None else key)
        return None if comm == MPI.COMM_NULL else Group(comm, name, self.ledger, self.algorithm, self.direct)

    def dup(self, name):
        """Same members, separate communicator: its messages never match this group's."""
        return Group(self.comm.Dup(), name, self.ledger, self.algorithm, self.direct)

    def _record(self, op, x, elements=None):
        elements = x.size if elements is None else elements
        nbytes = elements * x.dtype.itemsize
        self.ledger.record(op, self.name, str(x.dtype), elements, ring_bytes(op, nbytes, self.size))

    # -- reductions ------------------------------------------------------------------
    def _reduce_(self, buf, op):
        """All-reduce the wire buffer in place (MPI's Allreduce or, on the host, ring.py)."""
        if self.algorithm == "ring":
            ring.ring_all_reduce_(self, buf.reshape(-1), _UFUNCS[op])
        else:
            self.comm.Allreduce(MPI.IN_PLACE, mpi_view(buf), op=_MPI_OPS[op])
        if op == "avg":
            buf /= self.size

    @_timed
    def all_reduce(self, x, op="sum"):
        """A new array: op ("sum" | "avg" | "max") over the group, elementwise.
        Ledger: 2(n-1)/n * S, S = x.nbytes."""
        _check_op(op)
        buf = self.wire.out(x, wire_dtype(x.dtype), copy=True)
        self._reduce_(buf, op)
        self._record("all_reduce", x)
        return self.wire.back(buf, x)

    @_timed
    def all_reduce_(self, x, op="sum"):
        """all_reduce into x itself (zero copies for contiguous host non-fp16 x). Returns x."""
        _check_op(op)
        buf = self.wire.out(x, wire_dtype(x.dtype))
        self._reduce_(buf, op)
        self._record("all_reduce", x)
        self.wire.write_back(x, buf)
        return x

    @_timed
    def iall_reduce_(self, x, op="sum"):
        """Non-blocking all_reduce_ (MPI Iallreduce); x holds the result after `.wait()`.
        With algorithm "ring" it runs at once and returns a completed Request."""
        _check_op(op)
        if self.algorithm == "ring":
            self.all_reduce_(x, op)
            return Request()
        buf = self.wire.out(x, wire_dtype(x.dtype))
        self._record("all_reduce", x)
        request = self.comm.Iallreduce(MPI.IN_PLACE, mpi_view(buf), op=_MPI_OPS[op])

        def finish():
            if op == "avg":
                buf[...] /= self.size
            self.wire.write_back(x, buf)
        return Request(request, finish, keep=buf)

    @_timed
    def reduce_scatter(self, x, op="sum"):
        """This rank's block of the reduced x: x's first axis is cut into n blocks, rank r
        keeps block r, shape (x.shape[0]/n, ...). Ledger: (n-1)/n * S, S = x.nbytes."""
        _check_op(op)
        if x.ndim == 0 or x.shape[0] % self.size:
            raise ValueError(f"reduce_scatter over {self.name!r}: first axis of shape {x.shape} "
                             f"is not divisible by the group size {self.size}")
        block_shape = (x.shape[0] // self.size,) + tuple(x.shape[1:])
        if self.algorithm == "ring":
            work = self.wire.out(x, wire_dtype(x.dtype), copy=True).reshape(-1)
            block = ring.ring_reduce_scatter_(self, work, _UFUNCS[op]).reshape(block_shape)
        else:
            block = self.wire.empty(x, block_shape, wire_dtype(x.dtype))
            self.comm.Reduce_scatter_block(mpi_view(self.wire.out(x, block.dtype)), mpi_view(block),
                                           op=_MPI_OPS[op])
        if op == "avg":
            block /= self.size
        self._record("reduce_scatter", x)
        return self.wire.back(block, x)

    # -- data movement ---------------------------------------------------------------
    @_timed
    def all_gather(self, x):
        """Every rank's x concatenated along axis 0: shape (n * x.shape[0], ...), rank order.
        Ledger: (n-1)/n * S, S = bytes of the output."""
        mine = self.wire.out(x)
        mine = mine.reshape(mine.shape or (1,))  # (k, ...); a 0-d x counts as (1,)
        out = self.wire.empty(x, (self.size * mine.shape[0],) + mine.shape[1:], mine.dtype)
        if self.algorithm == "ring":
            blocks = out.reshape(self.size, mine.size)  # (n, x.size): block r is rank r's x
            blocks[self.rank] = mine.reshape(-1)
            ring.ring_all_gather_(self, blocks.reshape(-1))
        else:
            self.comm.Allgather(raw(mine), raw(out))
        self._record("all_gather", x, elements=out.size)
        return self.wire.back(out, x)

    @_timed
    def all_to_all(self, x):
        """Personalised exchange (MPI Alltoall): x's first axis is cut into n equal blocks,
        block j goes to rank j; the result has x's shape and its block j came from rank j.
        Ledger: (n-1)/n * S, S = x.nbytes (the n-1 blocks that leave this rank)."""
        if x.ndim == 0 or x.shape[0] % self.size:
            raise ValueError(f"all_to_all over {self.name!r}: first axis of shape {x.shape} "
                             f"is not divisible by the group size {self.size}")
        mine = self.wire.out(x)
        out = self.wire.empty(x, mine.shape, mine.dtype)
        self.comm.Alltoall(raw(mine), raw(out))
        self._record("all_to_all", x)
        return self.wire.back(out, x)

    @_timed
    def broadcast_(self, x, root=0):
        """Root's x into every rank's x, in place. Ledger: (n-1)/n * S, S = x.nbytes."""
        if self.rank == root:                  # the root's x is sent, never changed
            self.comm.Bcast(raw(self.wire.out(x)), root=root)
        else:                                  # the others' x is only written: nothing copied down
            buf = self.wire.landing(x)
            self.comm.Bcast(raw(buf), root=root)
            self.wire.write_back(x, buf)
        self._record("broadcast", x)
        return x

    @_timed
    def all_to_all_v(self, x, send_counts, recv_counts):
        """Variable all-to-all of rows: x (sum(send_counts), ...) is cut in rank order, its first
        send_counts[r] rows go to rank r; returns (sum(recv_counts), ...), the recv_counts[s]
        rows from rank s, in rank order. Both count vectors are known beforehand (exchange
        them with all_to_all first). Always MPI's Alltoallv.
        Ledger: the bytes of the rows sent to the *other* ranks, sum_{r != me} send_counts[r] * row."""
        send = self.wire.out(x)
        row = send[0].nbytes if send.shape[0] else send.dtype.itemsize * int(np.prod(send.shape[1:]))
        out = self.wire.empty(x, (int(np.sum(recv_counts)),) + tuple(send.shape[1:]), send.dtype)
        sc, rc = np.asarray(send_counts, np.int64) * row, np.asarray(recv_counts, np.int64) * row
        sd, rd = np.concatenate([[0], np.cumsum(sc)[:-1]]), np.concatenate([[0], np.cumsum(rc)[:-1]])
        self.comm.Alltoallv([raw(send), (sc.tolist(), sd.tolist()), MPI.BYTE],
                            [raw(out), (rc.tolist(), rd.tolist()), MPI.BYTE])
        others = int(sc.sum() - sc[self.rank])
        self.ledger.record("all_to_all_v", self.name, str(x.dtype), int(send.size),
                           others)
        return self.wire.back(out, x)

    @_timed
    def send(self, x, dest, tag=0):
        """Blocking send of x to group rank dest. Ledger: S = x.nbytes."""
        self.comm.Send(raw(self.wire.out(x)), dest=dest, tag=tag)
        self._record("send", x)

    @_timed
    def recv_(self, buf, source, tag=0):
        """Blocking receive into buf (shape and dtype must match the send). Ledger: 0."""
        landing = self.wire.landing(buf)
        self.comm.Recv(raw(landing), source=source, tag=tag)
        self._record("recv", buf)
        self.wire.write_back(buf, landing)
        return buf

    @_timed
    def isend(self, x, dest, tag=0):
        """Non-blocking send; do not modify x before `.wait()`. Ledger: S = x.nbytes."""
        wire = self.wire.out(x)
        request = self.comm.Isend(raw(wire), dest=dest, tag=tag)
        self._record("isend", x)
        return Request(request, keep=wire)

    @_timed
    def irecv_(self, buf, source, tag=0):
        """Non-blocking receive into buf, complete after `.wait()`. Ledger: 0."""
        landing = self.wire.landing(buf)
        request = self.comm.Irecv(raw(landing), source=source, tag=tag)
        self._record("irecv", buf)
        return Request(request, finish=lambda: self.wire.write_back(buf, landing), keep=landing)

    @_timed
    def sendrecv(self, x, dest, recvbuf, source, tag=0):
        """Send x to dest while receiving into recvbuf from source (no deadlock in a ring
        or a shift). Ledger: S = x.nbytes. Returns recvbuf."""
        landing = self.wire.landing(recvbuf)
        self.comm.Sendrecv(raw(self.wire.out(x)), dest=dest, sendtag=tag,
                           recvbuf=raw(landing), source=source, recvtag=tag)
        self._record("sendrecv", x)
        self.wire.write_back(recvbuf, landing)
        return recvbuf

    def raw_sendrecv(self, sendbuf, dest, recvbuf, source):
        """Sendrecv of contiguous host buffers that is NOT recorded: the building block of
        ring.py, whose caller records the one logical collective."""
        self.comm.Sendrecv(raw(sendbuf), dest=dest, sendtag=RING_TAG,
                           recvbuf=raw(recvbuf), source=source, recvtag=RING_TAG)

    @_timed
    def barrier(self):
        self.comm.Barrier()
        self.ledger.record("barrier", self.name, "none", 0, 0)

    # -- small metadata and verdicts -------------------------------------------------
    @_timed
    def allgather_object(self, obj):
        """[obj of rank 0, obj of rank 1, ...]: pickled, for small metadata only."""
        self.ledger.record("object", self.name, "object", 1, 0)
        return self.comm.allgather(obj)

    @_timed
    def bcast_object(self, obj, root=0):
        """Root's obj on every rank: pickled, for small metadata only."""
        self.ledger.record("object", self.name, "object", 1, 0)
        return self.comm.bcast(obj, root=root)

    @_timed
    def _scalar(self, value, op):
        buf = np.array([value], dtype=np.float64 if isinstance(value, float) else np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=op)
        self._record("scalar", buf)
        return buf[0].item()

    def max_(self, value):
        """The largest of every rank's Python scalar (always MPI's Allreduce; ledger: 0 bytes)."""
        return self._scalar(value, MPI.MAX)

    def sum_(self, value):
        """The sum of every rank's Python scalar (always MPI's Allreduce; ledger: 0 bytes)."""
        return self._scalar(value, MPI.SUM)

    def abort(self, code=1):
        """End every process of the job now (MPI_Abort): the way out when ranks diverged."""
        self.comm.Abort(code)


def exit_agreed(code):
    """End the job with `code` when every rank reached the same verdict (a usage error every
    rank detected alike in validation, a divergence every rank saw in the same loss), with
    nothing printed but the application's own line.

    Not MPI_Abort: MPICH prints "Abort(code) on node 0 ... MPI_Abort(...)" for it. Not each
    rank exiting with `code` either: MPICH's process manager (hydra) kills the ranks still
    running when the first one exits, and prints a "BAD TERMINATION" banner for them. So
    under hydra, once every rank has flushed, rank 0 makes the request MPI_Abort makes
    underneath, an abort of the job with `code` on its process-manager connection (the PMI
    wire protocol, fd $PMI_FD), and hydra ends every rank quietly; mpiexec returns `code`.
    Elsewhere (one process, another launcher) every rank finalizes and exits with `code`.
    A failure that only some ranks see must not come here (the others would wait forever):
    it raises, and `python -m mpi4py` turns the exception into MPI_Abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    world = MPI.COMM_WORLD
    world.Barrier()                 # everyone has printed and flushed
    if world.Get_size() > 1 and os.environ.get("PMI_FD", "").isdigit():
        if world.Get_rank() == 0:
            os.write(int(os.environ["PMI_FD"]), f"cmd=abort exitcode={code}\n".encode())
        time.sleep(30)              # hydra ends every rank; if it did not, exit as below
    MPI.Finalize()
    os._exit(code)                  # past mpi4py's exit hook, which would call MPI_Abort(code)
