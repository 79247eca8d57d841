"""The checkpoint manifest: its format, the files it names and their checksums, verified before use.

`manifest.json` is a checkpoint's commit point (checkpoint.py): it records the step,
the optimizer's step count, the loss scale, the model config, the layout and the seed,
one entry per saved slice (the serial name, the full shape, ShardSpec axis/start/stop,
the file and key holding it) and a SHA-256 of every file. `read_manifest` checks all
of that, and the model's shape against this run's, before anything is loaded.

Also here: what a checkpoint directory may hold (`OURS`, the only names a save writes
or deletes), and whether a path can take one (`check_save_target`, `writable_dir`).
"""
import hashlib
import json
import os
import re
import tempfile

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


def sha256(path):
    """The SHA-256 of a file, as hex: the manifest's check that a file is whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        if sha256(fpath) != digest:
            raise CheckpointError(f"checkpoint file {fpath} is truncated or corrupt (checksum mismatch)")
    return manifest


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
