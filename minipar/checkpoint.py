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

This file writes and loads; the manifest's format and verification are manifest.py,
assembling and cutting the slices is reshard.py.
"""
import json
import os
import secrets
import shutil
from dataclasses import asdict

import numpy as np

from minipar.backend import to_host
from minipar.manifest import FORMAT, KINDS, MANIFEST, OURS, read_manifest, sha256
from minipar.reshard import Reader, local_state


def _reached(stage):
    """The save has reached `stage` (module docstring's table): a fault-injection point that
    tests replace to kill a save there. Does nothing."""


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
        entries.append({"file": fname, "sha256": sha256(os.path.join(path, fname))})
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


def load(path, engine):
    """Load a checkpoint saved under any layout into this engine; returns the step to resume at.
    Reads files only: no communication, so the caller agrees on the verdict."""
    manifest = read_manifest(path, engine.cfg)
    state = {}
    with Reader(path) as reader:
        for p in engine.params:
            state[p.name] = local_state(path, manifest, reader, p, engine.precision)
    engine.load_state(state, manifest["optimizer_t"], manifest["loss_scale"], manifest["clean_steps"])
    return manifest["step"]
