"""Checkpoints that reshard: save under one layout, resume under any other.

Each rank writes the slices it holds (parameters, and the optimizer's master,
m and v in the same local shapes) to `rank{r}.npz`; `manifest.json` records,
for every slice, the serial name, the full shape and where the slice sits
(ShardSpec axis/start/stop), plus the step, the optimizer's step count, the
loss scale, the model config and a SHA-256 of every file. Loading under a new
layout assembles each needed serial array from the slices and takes the new
rank's slice: resharding is just "assemble, then cut".

    ckpt/                    written as ckpt.tmp-<id>/ first, renamed when complete,
      manifest.json          so a crash never leaves a half checkpoint under ckpt/
      rank0.npz rank1.npz ...

Data-parallel replicas hold identical slices, so only dp rank 0 writes.
Files are read with np.load(allow_pickle=False): a checkpoint cannot run code.
"""
import hashlib
import json
import os
import shutil
from dataclasses import asdict

import numpy as np

from minipar.backend import to_host

KINDS = ("param", "master", "m", "v")


class CheckpointError(Exception):
    """Missing, truncated, corrupt or mismatched checkpoint."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _local_slices(engine):
    """[(kind, name, spec, array)] for what this rank holds."""
    out = []
    for name, (p, opt) in engine.named_state().items():
        out.append(("param", name, p.spec, p.data))
        for kind in ("master", "m", "v"):
            if kind in opt and opt[kind] is not None and not (kind == "master" and opt[kind] is p.data):
                out.append((kind, name, p.spec, opt[kind]))
    return out


def save(path, engine, step, world=None):
    """Collective over `world`: write the checkpoint of the state after `step` steps."""
    rank = world.rank if world is not None else 0
    tmp = f"{path}.tmp-{os.getpid() if world is None else world.bcast_object(os.getpid())}"
    slices = _local_slices(engine)            # collective for ZeRO (gathers m, v): every rank calls it
    writer = engine.dp_rank == 0
    if not writer and engine.experts is not None and engine.experts.edp_group.rank == 0:
        expert = {p.name for p in engine.expert_params}      # the ep ranks hold different experts
        slices, writer = [s for s in slices if s[1] in expert], True
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world is not None:
        world.barrier()
    entries = []
    if writer:
        fname = f"rank{rank}.npz"
        arrays = {f"{kind}/{name}": to_host(a, engine.ledger.transfers)         # device -> host
                  for kind, name, _, a in slices}
        np.savez(os.path.join(tmp, fname), **arrays)
        entries = [{"kind": kind, "name": name, "file": fname, "key": f"{kind}/{name}",
                    "full_shape": list(spec.full_shape), "axis": spec.axis, "start": spec.start,
                    "stop": spec.stop} for kind, name, spec, _ in slices]
        entries.append({"file": fname, "sha256": _sha256(os.path.join(tmp, fname))})
    everything = world.allgather_object(entries) if world is not None else [entries]
    if rank == 0:
        files = {e["file"]: e["sha256"] for part in everything for e in part if "sha256" in e}
        manifest = {"format": "minipar-checkpoint-1", "step": step, "config": asdict(engine.cfg),
                    "layout": asdict(engine.layout), "optimizer_t": engine.optimizer_step_count(),
                    "loss_scale": engine.scaler.scale if engine.scaler else None,
                    "clean_steps": engine.scaler.clean_steps if engine.scaler else None,
                    "files": files,
                    "slices": [e for part in everything for e in part if "sha256" not in e]}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)                 # atomic on one file system
    if world is not None:
        world.barrier()


def read_manifest(path, cfg):
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path) or not os.path.isfile(mpath):
        raise CheckpointError(f"no checkpoint at {path} (missing manifest.json)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"corrupt checkpoint manifest {mpath}: {err}") from None
    if manifest.get("format") != "minipar-checkpoint-1":
        raise CheckpointError(f"{mpath} is not a minipar checkpoint")
    saved = manifest["config"]
    for key in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "tied_embeddings"):
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(f"checkpoint {path} has {key}={saved.get(key)}, this run has "
                                  f"{getattr(cfg, key)}")
    for fname, digest in manifest["files"].items():
        fpath = os.path.join(path, fname)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path} is missing {fname}")
        if _sha256(fpath) != digest:
            raise CheckpointError(f"checkpoint file {fpath} is truncated or corrupt (checksum mismatch)")
    return manifest


def assemble(path, manifest, kind, name):
    """The full serial array `kind/name` from all saved slices, or None if not saved."""
    parts = [e for e in manifest["slices"] if e["kind"] == kind and e["name"] == name]
    if not parts:
        return None
    full = None
    for e in parts:
        with np.load(os.path.join(path, e["file"]), allow_pickle=False) as f:
            piece = f[e["key"]]
        if full is None:
            full = np.empty(e["full_shape"], dtype=piece.dtype)
        index = (slice(None),) if e["axis"] is None else \
            (slice(None),) * e["axis"] + (slice(e["start"], e["stop"]),)
        full[index] = piece
    return full


def load(path, engine):
    """Load a checkpoint saved under any layout into this engine; returns the step to resume at."""
    manifest = read_manifest(path, engine.cfg)
    state = {}
    for name, (p, _) in engine.named_state().items():
        state[name] = {}
        for kind in KINDS:
            full = assemble(path, manifest, kind, name)
            if full is None:
                if kind == "param":
                    raise CheckpointError(f"checkpoint {path} has no parameter {name!r}")
                continue
            state[name][kind] = p.spec.take(full)
    engine.load_state(state, manifest["optimizer_t"], manifest["loss_scale"], manifest["clean_steps"])
    return manifest["step"]
