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

# `train --check` compares every step of a whole run, not 2-3 steps as the tests do.
# Two effects grow the honest difference over hundreds of steps: (1) as the loss goes
# to ~1e-3, gradients shrink by orders of magnitude while the rounding of the terms
# that cancel inside them does not; (2) Adam divides by sqrt(v) + eps, so rounding
# noise on an exactly-zero gradient (the key bias: softmax ignores a shift of the
# keys) becomes a step of up to lr * noise / eps. Both are reduction order, not bugs.
RUN_TOLERANCE = {"fp64": 1e-7, "fp32": 1e-1, "mixed": 2e-1}


def rel_err(got, expected):
    got, expected = to_host(got).astype(np.float64), to_host(expected).astype(np.float64)
    if got.shape != expected.shape:
        return float("inf")
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    return float(np.abs(got - expected).max(initial=0.0)) / scale


def compare_models(local, serial, quantities=("param", "grad", "m", "v")):
    """[(quantity, name, err)] for every local parameter against its serial slice.

    `local` and `serial` are Engine-like objects with `named_state()`; under ZeRO the local
    parameters and gradients are gathered for the comparison (collective over dp)."""
    inspect = getattr(local, "inspect", None)
    if inspect is not None:
        with inspect():
            return compare_models(_Plain(local), serial, quantities)
    theirs = serial.named_state()
    rows = []
    # gradients first: when a gradient is wrong, the updated parameter and Adam state are
    # wrong too, and the first divergence reported should be the cause
    for name, (p, opt) in local.named_state().items():
        sp, sopt = theirs[name]
        take = p.spec.take
        if "param" in quantities:
            rows.append(("param", name, rel_err(p.data, take(sp.data))))
        if "grad" in quantities and p.grad is not None and sp.grad is not None:
            rows.append(("grad", name, rel_err(p.grad, take(sp.grad))))
        for key in ("m", "v"):
            if key in quantities and key in opt and key in sopt:
                rows.append((key, name, rel_err(opt[key], take(sopt[key]))))
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
    worst error exceeds tol, naming the first quantity that diverged and the rank.
    `loss` = (local, serial) is compared first. Returns the global max error."""
    if loss is not None:
        rows = [("loss", "loss", rel_err(np.asarray(loss[0]), np.asarray(loss[1])))] + list(rows)
    worst = max((r[2] for r in rows), default=0.0)
    first_bad = next((r for r in rows if not r[2] <= tol), None)
    worst_all = worst if group is None else float(group.all_reduce(np.array([worst]), op="max")[0])
    if not worst_all <= tol:
        reports = [first_bad] if group is None else group.allgather_object(first_bad)
        bad = [(rank, r) for rank, r in enumerate(reports) if r is not None]
        rank, (qty, name, err) = bad[0]
        raise ParityError(f"parity failed{where}: first divergence is {qty} of {name!r} on rank {rank} "
                          f"(rel err {err:.3e} > tol {tol:.1e}); ranks failing: {[r for r, _ in bad]}")
    return worst_all
