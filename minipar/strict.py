"""A strict stand-in for CuPy that runs on the CPU: `--device strict`.

CuPy arrays live on the GPU, so mixing them with NumPy is an error unless the
move is explicit (`cupy.asarray(host)`, `device_array.get()`). A plain NumPy
run cannot catch code that forgets this; this module can. A `StrictArray`
wraps a NumPy array and behaves like a CuPy array:

  * `np.asarray(a)`, `np.exp(a)`, `a + host_array` raise TypeError: no implicit
    device -> host or host -> device conversion, no NumPy call on device data;
  * `strict.asarray(host)` is the explicit host -> device move, `a.get()` the way back;
  * `float(a)`, `int(a)`, `a.item()` are allowed (CuPy allows them: a synchronising read).

`array_module(a)` returns this module for a StrictArray, exactly as it returns
`cupy` for a CuPy array, so compute code written against `xp` runs unchanged.
The test suite runs every parity test on it (`pytest --device strict`), so an
accidental host round-trip fails on CPU CI long before anyone has a GPU.
"""
import sys

import numpy as _np


class HostDeviceMixError(TypeError):
    """Compute code mixed host (NumPy) and device data without an explicit move."""


def _refuse(what):
    raise HostDeviceMixError(f"strict device: {what}; move it explicitly (backend.to_device / to_host)")


def _unwrap(obj):
    """StrictArray -> its NumPy array; a raw NumPy array here is a host array used as device data."""
    if isinstance(obj, StrictArray):
        return obj._a
    if isinstance(obj, _np.ndarray):
        _refuse(f"a host numpy array of shape {obj.shape} was passed to device code")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o) for o in obj)
    return obj


def _wrap(obj):
    if isinstance(obj, _np.ndarray):
        return StrictArray(obj)
    if isinstance(obj, tuple):
        return tuple(_wrap(o) for o in obj)
    if isinstance(obj, list) and obj and all(isinstance(o, _np.ndarray) for o in obj):
        return [StrictArray(o) for o in obj]
    return obj


def _call(fn, *args, **kwargs):
    return _wrap(fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))


class StrictArray:
    """A device array on the CPU: NumPy inside, CuPy's rules outside."""
    __slots__ = ("_a",)
    __array_ufunc__ = None           # numpy ufuncs on a StrictArray raise TypeError

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        _refuse("implicit conversion of a device array to numpy (use .get())")

    @property
    def __xp__(self):
        return sys.modules[__name__]

    def get(self):
        """The explicit device -> host copy (as cupy.ndarray.get)."""
        return self._a.copy()

    # plain attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: StrictArray(self._a.T))

    def __getattr__(self, name):     # methods: reshape, astype, sum, max, argmax, swapaxes, ...
        if name.startswith("__array"):   # __array_interface__, __array_struct__: numpy's back doors
            _refuse("implicit conversion of a device array to numpy (use .get())")
        attr = getattr(self._a, name)
        return (lambda *a, **k: _call(attr, *a, **k)) if callable(attr) else _wrap(attr)

    def __getitem__(self, index):
        return _wrap(self._a[_unwrap(index)])

    def __setitem__(self, index, value):
        self._a[_unwrap(index)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"StrictArray({self._a!r})"

    # synchronising scalar reads, allowed as in CuPy
    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()


def _binary(name):
    def op(self, other):
        return _wrap(getattr(self._a, name)(_unwrap(other)))
    op.__name__ = name
    return op


def _inplace(name):
    def op(self, other):
        getattr(self._a, name)(_unwrap(other))
        return self
    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor"):
    for _form in ("__{}__", "__r{}__"):
        setattr(StrictArray, _form.format(_name), _binary(_form.format(_name)))
    setattr(StrictArray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__"):
    setattr(StrictArray, _name, _binary(_name))
for _name in ("__neg__", "__pos__", "__abs__", "__invert__"):
    setattr(StrictArray, _name, (lambda n: lambda self: StrictArray(getattr(self._a, n)()))(_name))
StrictArray.__hash__ = None


class _Ufunc:
    """A numpy ufunc on device arrays, with the methods minipar uses (.at, .reduce)."""

    def __init__(self, ufunc):
        self._u = ufunc

    def __call__(self, *args, **kwargs):
        return _call(self._u, *args, **kwargs)

    def at(self, a, index, values):
        self._u.at(_unwrap(a), _unwrap(index), _unwrap(values))

    def reduce(self, *args, **kwargs):
        return _call(self._u.reduce, *args, **kwargs)


def asarray(obj, dtype=None):
    """The explicit host -> device move (as cupy.asarray): numpy arrays are welcome here."""
    if isinstance(obj, StrictArray):
        return obj if dtype is None else obj.astype(dtype)
    return StrictArray(_np.array(obj, dtype=dtype, copy=True))


array = asarray


def ascontiguousarray(a, dtype=None):
    return _call(_np.ascontiguousarray, a, dtype=dtype)


def __getattr__(name):
    """Every other numpy name: types and constants as they are, functions on device arrays."""
    attr = getattr(_np, name)
    if isinstance(attr, _np.ufunc):
        return _Ufunc(attr)
    if isinstance(attr, type) or not callable(attr):
        return attr                  # dtypes (strict.float32), inf, pi, newaxis, ...
    return lambda *a, **k: _call(attr, *a, **k)


def mpi_view(a):
    """What a CUDA-aware MPI reads and writes for device array `a`: its memory itself (here,
    the NumPy array inside). Only comm/wire.py's direct path may use it, as mpi4py does with
    a CuPy array's __cuda_array_interface__."""
    return a._a
