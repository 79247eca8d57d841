"""Group: the only door to MPI. Every byte minipar moves goes through here.

A `Group` wraps one MPI communicator: the whole job (`Group.world()`) or a
sub-group made by `split` (the tp, pp, dp groups of a ProcessGrid). Its
methods take and return arrays and call mpi4py's uppercase buffer methods
(Allreduce, Reduce_scatter_block, Allgather, Bcast, Send/Recv, Sendrecv, and
Alltoall / Alltoallv for expert parallelism's token dispatch). This file holds
the collectives; membership, sub-groups, point-to-point messages and small
metadata are the Communicator it extends (comm/communicator.py).

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
import numpy as np
from mpi4py import MPI

from minipar.comm import ring
from minipar.comm.communicator import Communicator
# CommEntry, CommLedger and ring_bytes are re-exported: `from minipar.comm.group import CommLedger, Group`
from minipar.comm.ledger import CommEntry, CommLedger, ring_bytes, timed  # noqa: F401
from minipar.comm.request import Request
from minipar.comm.wire import mpi_view, raw, wire_dtype

_MPI_OPS = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX}
_UFUNCS = {"sum": np.add, "avg": np.add, "max": np.maximum}
RING_TAG = 32000  # tag of ring.py's Sendrecv steps; user point-to-point tags stay below it


def _check_op(op):
    if op not in _MPI_OPS:
        raise ValueError(f"unknown reduction {op!r}: expected 'sum', 'avg' or 'max'")


class Group(Communicator):
    """A Communicator with the collectives: reductions (all_reduce, reduce_scatter) and data
    movement (all_gather, all_to_all, broadcast_), by MPI's own algorithms or ring.py's."""

    # -- reductions ------------------------------------------------------------------
    def _reduce_(self, buf, op):
        """All-reduce the wire buffer in place (MPI's Allreduce or, on the host, ring.py)."""
        if self.algorithm == "ring":
            ring.ring_all_reduce_(self, buf.reshape(-1), _UFUNCS[op])
        else:
            self.comm.Allreduce(MPI.IN_PLACE, mpi_view(buf), op=_MPI_OPS[op])
        if op == "avg":
            buf /= self.size

    @timed
    def all_reduce(self, x, op="sum"):
        """A new array: op ("sum" | "avg" | "max") over the group, elementwise.
        Ledger: 2(n-1)/n * S, S = x.nbytes."""
        _check_op(op)
        buf = self.wire.out(x, wire_dtype(x.dtype), copy=True)
        self._reduce_(buf, op)
        self._record("all_reduce", x)
        return self.wire.back(buf, x)

    @timed
    def all_reduce_(self, x, op="sum"):
        """all_reduce into x itself (zero copies for contiguous host non-fp16 x). Returns x."""
        _check_op(op)
        buf = self.wire.out(x, wire_dtype(x.dtype))
        self._reduce_(buf, op)
        self._record("all_reduce", x)
        self.wire.write_back(x, buf)
        return x

    @timed
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

    @timed
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
    @timed
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

    @timed
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

    @timed
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

    @timed
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

    def raw_sendrecv(self, sendbuf, dest, recvbuf, source):
        """Sendrecv of contiguous host buffers that is NOT recorded: the building block of
        ring.py, whose caller records the one logical collective."""
        self.comm.Sendrecv(raw(sendbuf), dest=dest, sendtag=RING_TAG,
                           recvbuf=raw(recvbuf), source=source, recvtag=RING_TAG)
