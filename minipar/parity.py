"""Parity: does a sharded run equal the serial run? One call, one collective verdict.

Every local parameter knows (its ShardSpec) which slice of which serial array it
is, so the expected value on any rank is `spec.take(serial_array)`: no gathering
is needed to compare, and a mismatch names the exact parameter and rank.

    err(a, b) = max|a - b| / max(max|b|, tiny)      (relative to the serial array's scale)

All ranks allreduce their worst error, so they agree on pass/fail and a
failure never deadlocks. Tolerances: float64 1e-12-ish (only reduction order
differs); float32 and mixed precision have their own, stated in TOLERANCE.
"""
import numpy as np

from minipar.backend import to_host

TOLERANCE = {"fp64": 1e-10, "fp32": 1e-4, "mixed": 5e-2}

# `train --check` compares every step of a whole run, not 2-3 steps as the tests do, and
# the honest difference grows: during the fast-learning phase the training dynamics
# amplify reduction-order differences (measured, fp64, 8 layers, dp=8: 6e-14 at step 0,
# 4e-9 at step 50, then flat near 4e-7 to step 300; plain DP and pipelines alike), and
# near convergence gradients shrink toward the rounding of the terms that cancel in
# them. Adam then turns near-zero gradients (the key bias, which softmax ignores) into
# steps of up to lr. So whole runs use the norm metric and these bounds. Mixed precision,
# measured the same way: the loss agrees to 5 digits, parameters to 3.5e-2, v to 1.2e-2,
# but fp16 gradients near convergence sit at their rounding floor (grad and m up to ~0.4).
RUN_TOLERANCE = {"fp64": 1e-5, "fp32": 1e-1,
                 "mixed": {"loss": 1e-2, "param": 1e-1, "v": 1e-1, "m": 1.0, "grad": 1.0}}
RUN_METRIC = {"fp64": "norm", "fp32": "norm", "mixed": "norm"}


def rel_err(got, expected, metric="max"):
    """max: max|a - b| / max|b|, the strict per-element check the tests use;
    norm: ||a - b||_2 / ||b||_2, for whole-run checks (train --check), where a few entries
    (near-zero gradients that Adam turns into full steps) would dominate the max."""
    got, expected = to_host(got).astype(np.float64), to_host(expected).astype(np.float64)
    if got.shape != expected.shape:
        return float("inf")
    if metric == "norm":
        return float(np.linalg.norm(got - expected)) / max(float(np.linalg.norm(expected)), 1e-300)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    return float(np.abs(got - expected).max(initial=0.0)) / scale


def compare_models(local, serial, quantities=("param", "grad", "m", "v"), metric="max"):
    """[(quantity, name, err)] for every local parameter against its serial slice.

    `local` and `serial` are Engine-like objects with `named_state()`; under ZeRO the local
    parameters and gradients are gathered for the comparison (collective over dp)."""
    inspect = getattr(local, "inspect", None)
    if inspect is not None:
        with inspect():
            return compare_models(_Plain(local), serial, quantities, metric)
    theirs = serial.named_state()
    rows = []
    # gradients first: when a gradient is wrong, the updated parameter and Adam state are
    # wrong too, and the first divergence reported should be the cause
    for name, (p, opt) in local.named_state().items():
        sp, sopt = theirs[name]
        take = p.spec.take
        if "param" in quantities:
            rows.append(("param", name, rel_err(p.data, take(sp.data), metric)))
        if "grad" in quantities and p.grad is not None and sp.grad is not None:
            rows.append(("grad", name, rel_err(p.grad, take(sp.grad), metric)))
        for key in ("m", "v"):
            if key in quantities and key in opt and key in sopt:
                rows.append((key, name, rel_err(opt[key], take(sopt[key]), metric)))
    order = {"grad": 0, "param": 1, "m": 2, "v": 3}
    return sorted(rows, key=lambda r: order[r[0]])


class _Plain:
    """An engine seen without its inspect() (already inside it)."""

    def __init__(self, engine):
        self.named_state = engine.named_state


class ParityError(AssertionError):
    pass


def check(group, rows, tol, where="", loss=None):
    """Collective verdict over `group`: raise ParityError on every rank if any rank's
    error exceeds tol (a number, or {quantity: number}), naming the first quantity that
    diverged and the rank. `loss` = (local, serial) is compared first. Returns the global
    max error."""
    limit = (lambda q: tol[q]) if isinstance(tol, dict) else (lambda q: tol)
    if loss is not None:
        rows = [("loss", "loss", rel_err(np.asarray(loss[0]), np.asarray(loss[1])))] + list(rows)
    worst = max((r[2] for r in rows), default=0.0)
    first_bad = next((r for r in rows if not r[2] <= limit(r[0])), None)
    failed = 0.0 if first_bad is None else 1.0
    if group is not None:
        # all-reduce (max) of 2 floats over the group: the worst error and "some rank failed"
        worst, failed = (float(v) for v in group.all_reduce(np.array([worst, failed]), op="max"))
    if failed:
        reports = [first_bad] if group is None else group.allgather_object(first_bad)
        bad = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        rank, (qty, name, err) = bad[0]
        raise ParityError(f"parity failed{where}: first divergence is {qty} of {name!r} on rank {rank} "
                          f"(rel err {err:.3e} > tol {limit(qty):.1e}); ranks failing: {[r for r, _ in bad]}")
    return worst
