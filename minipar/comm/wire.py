"""How an array becomes a buffer MPI can read, and how the result comes back.

MPI moves memory through a pointer, so a buffer must be contiguous, of a type
MPI can reduce, and in memory the MPI library can reach:

    array           MPI library          what MPI is handed
    NumPy (host)    any                  the array itself (a contiguous copy only if it must)
    CuPy (device)   CUDA-aware           the device array itself, once the stream that wrote
                                         it has finished (`synchronize`): no host copy at all
    CuPy (device)   not CUDA-aware       a host copy ("staging"): device -> host before the
                                         call, host -> device after; both counted in Transfers

The PyPI MPICH is not CUDA-aware, so a GPU run with it stages every message;
`Transfers` says how many bytes that costs each way. communicator.py asks the
MPI library once (`cuda_aware()`) and gives each Group a Wire.

float16 is reduced in float32 (MPI has no portable half-precision sum, and
summing in fp32 loses less): the caller asks for a float32 buffer and casts back.

This file does not import mpi4py: it only prepares and unpacks buffers.
"""
import numpy as np

from minipar.backend import array_module, synchronize, to_device, to_host


def wire_dtype(dtype):
    """The dtype a buffer of `dtype` is reduced in: float16 -> float32, others as they are."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def raw(buf):
    """What mpi4py is handed for data that is only moved: the buffer's bytes (uint8)."""
    return mpi_view(buf).reshape(-1).view(np.uint8)


def mpi_view(buf):
    """What mpi4py is handed for a typed buffer: NumPy and CuPy arrays as they are (mpi4py reads
    CuPy's __cuda_array_interface__); minipar.strict exposes the memory behind its stand-in."""
    view = getattr(array_module(buf), "mpi_view", None)
    return buf if view is None else view(buf)


class Wire:
    """Buffers for one Group: `direct` when MPI reads device memory itself, else staged
    through host memory with every crossing added to `transfers` (a backend.Transfers)."""

    def __init__(self, direct, transfers):
        self.direct, self.transfers = direct, transfers

    def stays_on_device(self, x):
        return self.direct and array_module(x) is not np

    def out(self, x, dtype=None, copy=False):
        """x as a contiguous buffer of `dtype` that MPI may read (and, with copy=True, write
        without touching x). Host arrays are copied only when they must be."""
        dtype = x.dtype if dtype is None else dtype
        if self.stays_on_device(x):
            buf = x.astype(dtype, order="C", copy=copy)    # device -> device, only when it must
            synchronize(buf)                               # the kernels writing it are done
            return buf
        host = to_host(x, self.transfers)                  # device -> host staging (counted)
        if copy and host is x:
            return np.array(host, dtype=dtype, order="C")
        return np.asarray(host, dtype=dtype, order="C")

    def empty(self, x, shape, dtype):
        """A new buffer for MPI to write into, where `out(x)` would have put x."""
        xp = array_module(x) if self.stays_on_device(x) else np
        return xp.empty(shape, dtype)

    def landing(self, x):
        """Where MPI writes a result meant for x: x itself when MPI can write there directly,
        else a new buffer (in host memory when staged: nothing is copied down first)."""
        reachable = array_module(x) is np or self.stays_on_device(x)
        return x if reachable and x.flags.c_contiguous else self.empty(x, x.shape, x.dtype)

    def back(self, buf, x):
        """A result buffer as an array like x: x's dtype, in x's memory."""
        buf = buf.astype(x.dtype, copy=False)
        if array_module(buf) is array_module(x):
            return buf
        return to_device(buf, array_module(x), self.transfers)   # host -> device (counted)

    def write_back(self, x, buf):
        """Copy a result into x itself, unless MPI already wrote it there."""
        if buf is not x:
            x[...] = self.back(buf.reshape(x.shape), x)
