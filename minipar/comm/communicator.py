"""Communicator: one MPI communicator's members, sub-groups, point-to-point messages and metadata.

The part of a Group (comm/group.py) that is not a collective on arrays: who is in it
(rank, size, their world ranks), how sub-groups are made (`split`, `dup`), blocking and
non-blocking messages between two ranks (Send/Recv, Isend/Irecv, Sendrecv), and the
pickled metadata and scalar verdicts every rank must agree on. Group adds the
collectives; every method here records its call in the ledger (comm/ledger.py) as well.

Whether device arrays go to MPI directly depends on the MPI library: `cuda_aware()`
asks it once per process.
"""
import ctypes
import functools

import numpy as np
from mpi4py import MPI

from minipar.comm.ledger import CommLedger, ring_bytes, timed
from minipar.comm.request import Request
from minipar.comm.wire import Wire, raw


@functools.lru_cache(maxsize=None)
def cuda_aware():
    """True when the MPI library reads and writes GPU memory itself: its
    MPIX_Query_cuda_support() (exported by MPICH >= 4.1 and Open MPI) returns 1.
    Asked once per process, after MPI_Init; any library without the call counts as not aware."""
    try:
        return bool(ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support())
    except (OSError, AttributeError):
        return False


class Communicator:
    """A set of ranks that communicate: rank, size, ranks (their world ranks), ledger, algorithm.
    Made through its subclass Group (`Group.world()`, `Group.single()`, `split`, `dup`)."""

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
        return type(self)(self.comm, name or self.name, self.ledger if ledger is None else ledger,
                          algorithm or self.algorithm, self.direct)

    def split(self, color, key=None, name="split"):
        """Sub-group of the ranks passing the same color, ordered by key (default: rank).
        Collective over this group; color Group.UNDEFINED returns None."""
        comm = self.comm.Split(color, self.rank if key is None else key)
        if comm == MPI.COMM_NULL:
            return None
        return type(self)(comm, name, self.ledger, self.algorithm, self.direct)   # a Group's are Groups

    def dup(self, name):
        """Same members, separate communicator: its messages never match this group's."""
        return type(self)(self.comm.Dup(), name, self.ledger, self.algorithm, self.direct)

    def _record(self, op, x, elements=None):
        elements = x.size if elements is None else elements
        nbytes = elements * x.dtype.itemsize
        self.ledger.record(op, self.name, str(x.dtype), elements, ring_bytes(op, nbytes, self.size))

    # -- point to point ---------------------------------------------------------------
    @timed
    def send(self, x, dest, tag=0):
        """Blocking send of x to group rank dest. Ledger: S = x.nbytes."""
        self.comm.Send(raw(self.wire.out(x)), dest=dest, tag=tag)
        self._record("send", x)

    @timed
    def recv_(self, buf, source, tag=0):
        """Blocking receive into buf (shape and dtype must match the send). Ledger: 0."""
        landing = self.wire.landing(buf)
        self.comm.Recv(raw(landing), source=source, tag=tag)
        self._record("recv", buf)
        self.wire.write_back(buf, landing)
        return buf

    @timed
    def isend(self, x, dest, tag=0):
        """Non-blocking send; do not modify x before `.wait()`. Ledger: S = x.nbytes."""
        wire = self.wire.out(x)
        request = self.comm.Isend(raw(wire), dest=dest, tag=tag)
        self._record("isend", x)
        return Request(request, keep=wire)

    @timed
    def irecv_(self, buf, source, tag=0):
        """Non-blocking receive into buf, complete after `.wait()`. Ledger: 0."""
        landing = self.wire.landing(buf)
        request = self.comm.Irecv(raw(landing), source=source, tag=tag)
        self._record("irecv", buf)
        return Request(request, finish=lambda: self.wire.write_back(buf, landing), keep=landing)

    @timed
    def sendrecv(self, x, dest, recvbuf, source, tag=0):
        """Send x to dest while receiving into recvbuf from source (no deadlock in a ring
        or a shift). Ledger: S = x.nbytes. Returns recvbuf."""
        landing = self.wire.landing(recvbuf)
        self.comm.Sendrecv(raw(self.wire.out(x)), dest=dest, sendtag=tag,
                           recvbuf=raw(landing), source=source, recvtag=tag)
        self._record("sendrecv", x)
        self.wire.write_back(recvbuf, landing)
        return recvbuf

    # -- synchronisation, small metadata and verdicts ---------------------------------
    @timed
    def barrier(self):
        self.comm.Barrier()
        self.ledger.record("barrier", self.name, "none", 0, 0)

    @timed
    def allgather_object(self, obj):
        """[obj of rank 0, obj of rank 1, ...]: pickled, for small metadata only."""
        self.ledger.record("object", self.name, "object", 1, 0)
        return self.comm.allgather(obj)

    @timed
    def bcast_object(self, obj, root=0):
        """Root's obj on every rank: pickled, for small metadata only."""
        self.ledger.record("object", self.name, "object", 1, 0)
        return self.comm.bcast(obj, root=root)

    @timed
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
