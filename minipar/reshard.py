"""Resharding on load: assemble each serial array from a checkpoint's slices, then cut this rank's.

A checkpoint holds every parameter and optimizer state as the tensor/pipeline slices
of the layout that saved it (checkpoint.py). Under any other layout, each rank
rebuilds the whole serial array from the slices the manifest lists (every shape
checked, the slices covering it, every value finite) and takes its own slice with the
parameter's ShardSpec: "assemble, then cut". Files are read with
np.load(allow_pickle=False): a checkpoint cannot run code.
"""
import os
import zipfile

import numpy as np

from minipar.manifest import KINDS, CheckpointError


class Reader:
    """The arrays of a checkpoint's files, each file opened once (np.load, no pickles)."""

    def __init__(self, path):
        self.path, self.files = path, {}

    def get(self, fname, key):
        if fname not in self.files:
            try:
                self.files[fname] = np.load(os.path.join(self.path, fname), allow_pickle=False)
            except (OSError, ValueError, zipfile.BadZipFile) as err:
                raise CheckpointError(f"checkpoint file {fname} cannot be read: {err}") from None
        f = self.files[fname]
        if key not in f.files:
            raise CheckpointError(f"checkpoint file {fname} has no array {key!r}")
        return f[key]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self.files.values():
            f.close()


def assemble(path, manifest, kind, name, reader=None):
    """The full serial array `kind/name` from all saved slices, or None if not saved. Every
    slice's shape is checked against its manifest entry, the slices must cover the whole
    array, and every value must be finite."""
    parts = [e for e in manifest["slices"] if e["kind"] == kind and e["name"] == name]
    if not parts:
        return None
    if reader is None:
        with Reader(path) as reader:
            return assemble(path, manifest, kind, name, reader)
    full = covered = None
    for e in parts:
        piece = reader.get(e["file"], e["key"])
        shape, axis = list(e["full_shape"]), e["axis"]
        if axis is not None:
            shape[axis] = e["stop"] - e["start"]
        if list(piece.shape) != shape:
            raise CheckpointError(f"checkpoint file {e['file']} holds {e['key']} of shape "
                                  f"{tuple(piece.shape)}, its manifest says {tuple(shape)}")
        if full is None:
            full, covered = np.empty(e["full_shape"], dtype=piece.dtype), np.zeros(
                1 if axis is None else e["full_shape"][axis], bool)
        index = (slice(None),) if axis is None else (slice(None),) * axis + (slice(e["start"], e["stop"]),)
        full[index] = piece
        covered[slice(None) if axis is None else slice(e["start"], e["stop"])] = True
    if not covered.all():
        raise CheckpointError(f"checkpoint {path}: the slices of {kind} {name!r} do not cover it")
    if not np.isfinite(full).all():
        raise CheckpointError(f"checkpoint {path} holds non-finite values in {kind} {name!r}")
    return full


def local_state(path, manifest, reader, p, precision):
    """{kind: this rank's slice} of parameter p, as saved."""
    state = {}
    for kind in KINDS:
        full = assemble(path, manifest, kind, p.name, reader)
        if full is None:
            if kind == "param":
                raise CheckpointError(f"checkpoint {path} has no parameter {p.name!r}")
            continue
        if full.shape != tuple(p.spec.full_shape):
            raise CheckpointError(f"checkpoint {path} has {kind} {p.name!r} of shape {full.shape}, "
                                  f"this model's is {tuple(p.spec.full_shape)}")
        state[kind] = p.spec.take(full)
    if "master" in state and not precision.has_master:
        state["param"] = state["master"]             # e.g. mixed -> fp64: the fp32 values
    return state
