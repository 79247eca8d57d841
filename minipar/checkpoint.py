"""Checkpoints that reshard: save under one layout, resume under any other.

Each rank writes the slices it holds to its own `.npz` file: every local
parameter and its optimizer state (the fp32 master copy when the precision
keeps one, Adam's m and v or SGD's momentum), in the local parameter's shape.
ZeRO's shards are gathered over dp first (the ModelOptimizer's `state()` and
`gathered()`), from host memory under Offload, so a checkpoint holds the serial
arrays' tensor/pipeline slices under every layout and never a placeholder.
`manifest.json` records, for every slice, the serial name, the full shape and
where the slice sits (ShardSpec axis/start/stop), plus the step (which is also
the data position: batches are a function of the seed and the step), the
optimizer's step count, the loss scale, the model config, the seed and a
SHA-256 of every file. Loading under a new layout assembles each needed serial
array from the slices and takes the new rank's slice: "assemble, then cut".

    ckpt/
      manifest.json               the commit point: it names the files that make the checkpoint
      rank0-<gen>.npz  rank1-<gen>.npz ...      one generation <gen> per save

Atomic at every instant. A save writes its files under a fresh generation name
beside the current ones (no manifest names them yet, so they do not count),
writes the new manifest as `manifest.json.tmp-<gen>`, verifies the new
checkpoint through it (every file there, every checksum right), and renames it
over `manifest.json`: that one rename, atomic on a POSIX file system, switches
from one complete checkpoint to the next. Only then are the old generation's
files deleted, with whatever an earlier crashed save left behind:

    killed at stage       on disk                                   --resume loads
    begin                 old checkpoint                            old
    rank file written     old + some new rank files                 old
    manifest written      old + new files + manifest.json.tmp-<gen> old
    committed             new manifest, old files still there       new
    cleaned               new checkpoint only                       new

Data-parallel replicas hold identical slices, so only dp rank 0 writes.
Files are read with np.load(allow_pickle=False): a checkpoint cannot run code.
"""
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import zipfile
from dataclasses import asdict

import numpy as np

from minipar.backend import to_host

FORMAT = "minipar-checkpoint-1"
MANIFEST = "manifest.json"
KINDS = ("param", "master", "m", "v", "momentum")
SHAPE_KEYS = ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "tied_embeddings")
MOE_KEYS = {"experts": 0, "top_k": 2, "moe_every": 1}     # and their values in a dense model's manifest
OURS = re.compile(r"rank\d+(-[0-9a-z-]+)?\.npz|manifest\.json(\.tmp-[0-9a-z-]+)?")   # what a save may leave


SLICE_KEYS = ("kind", "name", "file", "key", "full_shape", "axis", "start", "stop")


class CheckpointError(Exception):
    """Missing, truncated, corrupt or mismatched checkpoint."""


def _require(entry, keys):
    missing = [k for k in keys if k not in entry]
    if missing:
        raise KeyError(", ".join(missing))


def _reached(stage):
    """The save has reached `stage` (module docstring's table): a fault-injection point that
    tests replace to kill a save there. Does nothing."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_slices(engine):
    """[(kind, name, spec, host array)] for what this rank holds. Collective under ZeRO."""
    out, transfers = [], engine.ledger.transfers
    with engine.inspect():                       # ZeRO-3: whole parameters for the moment
        for name, (p, opt) in engine.named_state().items():   # ZeRO: state gathered over dp
            out.append(("param", name, p.spec, to_host(p.data, transfers)))        # device -> host
            for kind in KINDS[1:]:
                if kind in opt and (kind != "master" or engine.precision.has_master):
                    out.append((kind, name, p.spec, to_host(opt[kind], transfers)))
    return out


def save(path, engine, step, world=None):
    """Collective over `world`: write the checkpoint of the state after `step` steps."""
    rank = world.rank if world is not None else 0
    slices = _local_slices(engine)            # collective for ZeRO: every rank calls it
    gen = f"s{step}-{secrets.token_hex(4)}"
    if world is not None:
        gen = world.bcast_object(gen)         # one generation name for the whole job
    writer = engine.dp_rank == 0
    if not writer and engine.experts is not None and engine.experts.edp_group.rank == 0:
        expert = {p.name for p in engine.expert_params}      # the ep ranks hold different experts
        slices, writer = [s for s in slices if s[1] in expert], True
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    if world is not None:
        world.barrier()
    _reached("begin")
    entries = []
    if writer:
        fname = f"rank{rank}-{gen}.npz"
        with open(os.path.join(path, fname), "wb") as f:
            np.savez(f, **{f"{kind}/{name}": a for kind, name, _, a in slices})
            f.flush()
            os.fsync(f.fileno())
        entries = [{"kind": kind, "name": name, "file": fname, "key": f"{kind}/{name}",
                    "full_shape": list(spec.full_shape), "axis": spec.axis, "start": spec.start,
                    "stop": spec.stop} for kind, name, spec, _ in slices]
        entries.append({"file": fname, "sha256": _sha256(os.path.join(path, fname))})
        _reached("rank file written")
    everything = world.allgather_object(entries) if world is not None else [entries]
    if rank == 0:
        files = {e["file"]: e["sha256"] for part in everything for e in part if "sha256" in e}
        manifest = {"format": FORMAT, "step": step, "config": asdict(engine.cfg),
                    "layout": asdict(engine.layout), "seed": engine.seed,
                    "optimizer_t": engine.optimizer.t,
                    "loss_scale": engine.scaler.scale if engine.scaler else None,
                    "clean_steps": engine.scaler.clean_steps if engine.scaler else None,
                    "files": files,
                    "slices": [e for part in everything for e in part if "sha256" not in e]}
        tmp = f"{MANIFEST}.tmp-{gen}"
        with open(os.path.join(path, tmp), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _reached("manifest written")
        read_manifest(path, engine.cfg, tmp)          # verify the new checkpoint before it counts
        os.replace(os.path.join(path, tmp), os.path.join(path, MANIFEST))   # the commit: atomic
        _fsync_dir(path)
        _reached("committed")
        clean(path, keep=set(files) | {MANIFEST})
        _reached("cleaned")
    if world is not None:
        world.barrier()


def clean(path, keep):
    """Delete what earlier saves left in `path` that `keep` does not name: the previous
    generation's files, and the files and temporary manifests of a crashed save (also the
    `path.tmp-*` folders of minipar's older format). Only names a save writes are touched."""
    for name in os.listdir(path):
        if OURS.fullmatch(name) and name not in keep:
            os.remove(os.path.join(path, name))
    parent, base = os.path.split(os.path.abspath(path))
    for name in os.listdir(parent):
        old = os.path.join(parent, name)
        if name.startswith(f"{base}.tmp-") and os.path.isdir(old) and \
                all(OURS.fullmatch(f) for f in os.listdir(old)):
            shutil.rmtree(old)


def writable_dir(path):
    """Can files be created in the directory `path`? Tried, not guessed (root passes every
    os.access check, a read-only file system does not)."""
    try:
        with tempfile.TemporaryFile(dir=path):
            return True
    except OSError:
        return False


def check_save_target(path):
    """Why `path` cannot take a checkpoint (a one-line reason), or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a directory"
    if os.path.isdir(path):
        names = os.listdir(path)
        if names and MANIFEST not in names and not all(OURS.fullmatch(f) for f in names):
            return f"{path} is a directory that is not a minipar checkpoint (not writing into it)"
        return None if writable_dir(path) else f"{path} is not writable"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"the directory {parent} does not exist"
    return None if writable_dir(parent) else f"cannot create {path}: {parent} is not writable"


def read_manifest(path, cfg=None, name=MANIFEST):
    """The manifest, checked: format, keys, the model's shape (if `cfg`), every file's checksum."""
    mpath = os.path.join(path, name)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path} ({'not a directory' if os.path.exists(path) else 'not found'})")
    if not os.path.isfile(mpath):
        raise CheckpointError(f"no checkpoint at {path} (missing {name})")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint manifest {mpath}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a minipar checkpoint")
    try:
        saved, files, step = manifest["config"], manifest["files"], int(manifest["step"])
        int(manifest["optimizer_t"])
        _require(saved, SHAPE_KEYS)
        for e in manifest["slices"]:
            _require(e, SLICE_KEYS)
            if e["file"] not in files:
                raise KeyError(f"file {e['file']}")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"malformed checkpoint manifest {mpath}: bad or missing {err}") from None
    if step < 0:
        raise CheckpointError(f"malformed checkpoint manifest {mpath}: step {step}")
    for key in SHAPE_KEYS if cfg is not None else ():
        if saved[key] != getattr(cfg, key):
            flag = "--untied" if key == "tied_embeddings" else f"--{key.replace('_size', '').replace('_', '-')}"
            raise CheckpointError(f"checkpoint {path} has {key}={saved[key]}, this run has "
                                  f"{getattr(cfg, key)} ({flag})")
    for key, dense in MOE_KEYS.items() if cfg is not None and (cfg.experts or saved.get("experts")) else ():
        if saved.get(key, dense) != getattr(cfg, key):
            raise CheckpointError(f"checkpoint {path} has {key}={saved.get(key, dense)}, this run has "
                                  f"{getattr(cfg, key)} (--{key.replace('_', '-')})")
    for fname, digest in files.items():
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path} is missing {fname}")
        if _sha256(fpath) != digest:
            raise CheckpointError(f"checkpoint file {fpath} is truncated or corrupt (checksum mismatch)")
    return manifest


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


def load(path, engine):
    """Load a checkpoint saved under any layout into this engine; returns the step to resume at.
    Reads files only: no communication, so the caller agrees on the verdict."""
    manifest = read_manifest(path, engine.cfg)
    state = {}
    with Reader(path) as reader:
        for p in engine.params:
            state[p.name] = _local_state(path, manifest, reader, p, engine.precision)
    engine.load_state(state, manifest["optimizer_t"], manifest["loss_scale"], manifest["clean_steps"])
    return manifest["step"]


def _local_state(path, manifest, reader, p, precision):
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
