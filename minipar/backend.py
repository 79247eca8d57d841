"""Array backend and precision policy.

Compute code never imports numpy for math directly: it asks an array which module
it belongs to (`array_module(x)`), exactly like CuPy's `cupy.get_array_module`.
So the same op runs on NumPy arrays (CPU) or CuPy arrays (GPU); the choice is
made once, where arrays are created (`device_module("cpu" | "gpu")`), and
travels with the data. Moves between host and device are explicit
(`to_device`, `to_host`).

Precision policies (Micikevicius et al. 2018, "Mixed Precision Training"):

    policy   parameters/grads   compute   optimizer master copy
    fp64     float64            float64   none (update in place)
    fp32     float32            float32   none
    mixed    float16            float32   float32 master weights + loss scaling
"""
from dataclasses import dataclass

import numpy

from minipar import strict


def array_module(x):
    """numpy, cupy or minipar.strict: the module that owns array `x`."""
    own = getattr(x, "__xp__", None)           # minipar.strict's CuPy stand-in says so itself
    if own is not None:
        return own
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return numpy


DEVICES = ("cpu", "gpu", "strict")


def device_module(device):
    """The array module for a device name: "cpu" -> numpy, "gpu" -> cupy,
    "strict" -> minipar.strict (a CPU stand-in that enforces CuPy's rules)."""
    if device == "cpu":
        return numpy
    if device == "strict":
        return strict
    if device == "gpu":
        try:
            import cupy
        except ImportError as err:
            raise RuntimeError("--device gpu needs CuPy: pip install 'minipar[gpu]'") from err
        return cupy
    raise ValueError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}")


class Transfers:
    """Bytes copied between host and device memory, each way: the PCIe traffic a GPU run
    pays on top of MPI's. Only real crossings count, so on the CPU both stay 0.
    A MemoryLedger keeps one (the engine's moves of batches, parameters, offload shards),
    a CommLedger another (host staging of device buffers for a non-CUDA-aware MPI)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.to_device = 0
        self.to_host = 0

    def as_dict(self):
        return {"to_device": self.to_device, "to_host": self.to_host}


def _is_host(x):
    return array_module(x) is numpy


def to_device(x, xp, count=None):
    """Copy a host (numpy) array onto the device of module `xp` (no-op for numpy, or for an
    array already there). `count` (a Transfers) adds the bytes when the copy crosses."""
    if xp is numpy or not _is_host(x):
        return x
    out = xp.asarray(x)
    if count is not None:
        count.to_device += out.nbytes
    return out


def like(host, x, count=None):
    """A host array moved to wherever array `x` lives (the explicit move compute code uses)."""
    return to_device(host, array_module(x), count)


def to_host(x, count=None):
    """A numpy array with the contents of `x` (a device -> host copy for CuPy, which
    `count` adds up; numpy arrays come back as they are)."""
    if _is_host(x):
        return numpy.asarray(x)
    if count is not None:
        count.to_host += x.nbytes
    return x.get()


def synchronize(x):
    """Wait until the device has finished writing `x` (CuPy: its current stream). A CUDA-aware
    MPI reads device memory directly, so a kernel still running would race with it."""
    xp = array_module(x)
    if xp is not numpy and hasattr(xp, "cuda"):
        xp.cuda.get_current_stream().synchronize()


def scatter_add_rows(dw, rows, values):
    """dw[rows[i]] += values[i], repeated rows summed (numpy.add.at; CuPy < 13 spells it
    cupyx.scatter_add)."""
    xp = array_module(dw)
    if hasattr(xp.add, "at"):
        xp.add.at(dw, rows, values)
    else:
        import cupyx
        cupyx.scatter_add(dw, rows, values)


@dataclass(frozen=True)
class Precision:
    """Which dtype each kind of array uses under a precision policy."""
    name: str
    param_dtype: type      # parameters and their gradients
    compute_dtype: type    # activations and matmuls
    master_dtype: type     # optimizer's master copy and Adam states (m, v)
    has_master: bool       # True when params are a low-precision copy of a master

    @property
    def needs_loss_scaling(self):
        return self.param_dtype == numpy.float16


PRECISIONS = {
    "fp64": Precision("fp64", numpy.float64, numpy.float64, numpy.float64, False),
    "fp32": Precision("fp32", numpy.float32, numpy.float32, numpy.float32, False),
    "mixed": Precision("mixed", numpy.float16, numpy.float32, numpy.float32, True),
}


def precision(name):
    """Look up a policy by name ("fp64", "fp32", "mixed")."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}: expected one of {', '.join(PRECISIONS)}") from None
