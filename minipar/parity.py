"""Parity: does a sharded run equal the serial run? One relative error, one collective verdict.

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
from minipar.diagnosis import likely_cause, nearest

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


def format_tolerance(tol):
    """A tolerance as a person writes it: 1e-05, or "loss 0.01, param 0.1, v 0.1, m 1, grad 1"."""
    if isinstance(tol, dict):
        return ", ".join(f"{q} {v:g}" for q, v in tol.items())
    return f"{tol:g}"


TINY = 1e-300  # floor for every scale below, so an all-zero expectation still works


class VerdictError(AssertionError):
    """Raised on every rank of a group at once: the ranks agree the check failed."""


def agree(group, ok, message):
    """Pass if `ok` on every rank of group; else raise VerdictError on all of them.

    Under MPI a plain `assert` that fails on one rank leaves the others waiting in their
    next collective forever; a verdict first agrees on the outcome, so it never deadlocks."""
    __tracebackhide__ = True  # pytest: show the test's line, not this function
    # one int64 over the group: did any rank fail?
    if not group.max_(0 if ok else 1):
        return
    # small pickled strings from every rank: who failed and why
    messages = group.allgather_object(None if ok else str(message))
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    lines = [f"{len(failed)} of {group.size} ranks of group {group.name!r} failed:"]
    lines += [f"  rank {rank} (world rank {group.ranks[rank]}): {text}" for rank, text in failed]
    raise VerdictError("\n".join(lines))


def _diff_and_scale(got, expected, metric):
    """(size of got - expected, size of expected) in float64 on the host: max|.| or ||.||_2."""
    got, expected = to_host(got).astype(np.float64), to_host(expected).astype(np.float64)
    if metric == "norm":
        return float(np.linalg.norm(got - expected)), max(float(np.linalg.norm(expected)), TINY)
    return (float(np.abs(got - expected).max(initial=0.0)),
            max(float(np.abs(expected).max(initial=0.0)), TINY))


def rel_err(got, expected, metric="max"):
    """The one relative error of minipar.

    max:  max|a - b| / max|b|, the strict per-element check the tests use; one scale for
          the whole array, so elements near zero do not blow the error up;
    norm: ||a - b||_2 / ||b||_2, for whole-run checks (train --check), where a few entries
          (near-zero gradients that Adam turns into full steps) would dominate the max.
    A shape mismatch is inf, a NaN gives NaN, and equal non-finite scalars (a step skipped
    on both sides) agree with 0."""
    got, expected = np.asarray(to_host(got)), np.asarray(to_host(expected))
    if got.shape != expected.shape:
        return float("inf")
    if got.ndim == 0 and not (np.isfinite(got) and np.isfinite(expected)):
        return 0.0 if got == expected else float("inf")
    diff, scale = _diff_and_scale(got, expected, metric)
    return diff / scale


def assert_close(group, name, got, expected, rtol, atol=0.0):
    """Collective check on every rank: max|got - expected| <= atol + rtol * max|expected|.
    Returns this rank's rel_err (inf on a shape mismatch)."""
    __tracebackhide__ = True
    if np.shape(got) != np.shape(expected):
        err, ok = float("inf"), False
        why = f"shape {np.shape(got)} != expected {np.shape(expected)}"
    else:
        diff, scale = _diff_and_scale(got, expected, "max")
        err, ok = diff / scale, diff <= atol + rtol * scale  # ok is False for NaN
        why = (f"max rel err {err:.3e} > rtol {rtol:g}" + (f" + atol {atol:g}" if atol else "")
               + f" (max abs err {diff:.3e}, shape {np.shape(got)})")
    agree(group, ok, f"{name}: {why}")
    return err


class Rows(list):
    """[(quantity, name, err)] as compare_models builds them, with what a failure report needs:
    the local run's layout and, per (quantity, name), the factor <got, want>/<want, want>
    (a gradient summed where a mean belongs carries an integer factor)."""

    def __init__(self, rows=(), layout=None, scales=None):
        super().__init__(rows)
        self.layout, self.scales = layout, dict(scales or {})


def scale_factor(got, expected):
    """<got, want>/<want, want>: k when got = k * want; None for an all-zero expectation."""
    got, expected = to_host(got).astype(np.float64).ravel(), to_host(expected).astype(np.float64).ravel()
    if got.shape != expected.shape:
        return None
    denom = float(expected @ expected)
    return float(got @ expected) / denom if denom > 0 else None


def compare_models(local, serial, quantities=("param", "grad", "m", "v"), metric="max"):
    """Rows [(quantity, name, err)] for every local parameter against its serial slice, and
    ("grad_norm", "global", err) for the global gradient norm of the last step (what clipping
    used), when both engines have taken one.

    `local` and `serial` are Engines. Both are compared inside their inspect() view (the
    optimizer's declared gathered(): under ZeRO the local parameters and gradients are
    gathered for the comparison, collectively over dp; elsewhere it is a no-op)."""
    with local.inspect(), serial.inspect():
        theirs = serial.named_state()
        rows = Rows(layout=local.layout)
        # gradients first: when a gradient is wrong, the updated parameter and Adam state are
        # wrong too, and the first divergence reported should be the cause
        for name, (p, opt) in local.named_state().items():
            sp, sopt = theirs[name]
            take = p.spec.take
            if "param" in quantities:
                rows.append(("param", name, rel_err(p.data, take(sp.data), metric)))
            if "grad" in quantities and p.grad is not None and sp.grad is not None:
                rows.append(("grad", name, rel_err(p.grad, take(sp.grad), metric)))
                rows.scales["grad", name] = scale_factor(p.grad, take(sp.grad))
            for key in ("m", "v"):
                if key in quantities and key in opt and key in sopt:
                    rows.append((key, name, rel_err(opt[key], take(sopt[key]), metric)))
    if "grad" in quantities and local.grad_norm is not None and serial.grad_norm is not None:
        rows.append(("grad_norm", "global", rel_err(np.float64(local.grad_norm), np.float64(serial.grad_norm))))
        rows.scales["grad_norm", "global"] = float(local.grad_norm) / max(float(serial.grad_norm), TINY)
    order = {"grad": 0, "grad_norm": 1, "param": 2, "m": 3, "v": 4}
    rows.sort(key=lambda r: order[r[0]])
    return rows


class ParityError(VerdictError):
    """A collective verdict: raised on every rank of the group at once, with the same message
    (so the test harness prints it once, from rank 0, not once per rank)."""


def check(group, rows, tol, where="", loss=None):
    """Collective verdict over `group`: raise ParityError on every rank if any rank's
    error exceeds tol (a number, or {quantity: number}; grad_norm falls back to grad's).
    `loss` = (local, serial) is compared first. Returns the global max error.

    The message is one line: the likely cause (minipar/diagnosis.py, from the pattern of
    every row that failed on every rank), then the evidence: the differing quantity
    nearest the loss, its error, the ranks, and how many rows differ."""
    limit = (lambda q: tol.get(q, tol.get("grad"))) if isinstance(tol, dict) else (lambda q: tol)
    layout = rows.layout if isinstance(rows, Rows) else None
    scales = rows.scales if isinstance(rows, Rows) else {}
    if loss is not None:
        rows = [("loss", "loss", rel_err(np.asarray(loss[0]), np.asarray(loss[1])))] + list(rows)
    worst = max((r[2] for r in rows), default=0.0)
    bad = [(q, n, e, scales.get((q, n))) for q, n, e in rows if not e <= limit(q)]
    failed = 1.0 if bad else 0.0
    if group is not None:
        # all-reduce (max) of 2 floats over the group: the worst error and "some rank failed"
        worst, failed = (float(v) for v in group.all_reduce(np.array([worst, failed]), op="max"))
    if failed:
        # small pickled lists from every rank: each rank's failing rows and its row counts
        counts = {}
        for q, _, _ in rows:
            counts[q] = counts.get(q, 0) + 1
        mine = (bad, counts, sorted({n for q, n, _ in rows if q == "grad"}))
        reports = [mine] if group is None else group.allgather_object(mine)
        raise ParityError(failure_message(reports, layout, limit, where))
    return worst


def failure_message(reports, layout, limit, where=""):
    """One line from every rank's (failing rows, row counts): likely cause, then evidence."""
    everywhere = [(rank, q, n, e, s) for rank, (bad, _, _) in enumerate(reports) for q, n, e, s in bad]
    counts, names = {}, set()
    for _, c, held in reports:
        names.update(held)
        for q, k in c.items():
            counts[q] = counts.get(q, 0) + k
    cause = likely_cause(everywhere, counts, layout, len(reports), names)
    # evidence: the loss if it differs, else the differing quantity nearest the loss
    order = {"loss": 0, "grad": 1, "grad_norm": 2, "param": 3, "m": 4, "v": 5}
    first_q = min((r[1] for r in everywhere), key=order.get)
    rows_q = [r for r in everywhere if r[1] == first_q]
    name = nearest({r[2] for r in rows_q})
    on = sorted({r[0] for r in rows_q if r[2] == name})
    err = max(r[3] for r in rows_q if r[2] == name)
    differ = {q: sum(1 for r in everywhere if r[1] == q) for q in ("grad", "param")}
    tally = ", ".join(f"{differ[q]} of {counts[q]} {q}s" for q in differ if q in counts)
    label = "the loss" if first_q == "loss" else f"{first_q} of {name!r}"
    return (f"parity failed{where}: {cause} [{label}: rel err {err:.3e} > tol {limit(first_q):g} on "
            f"rank(s) {on} of {len(reports)}; {tally} differ (rows over all ranks)]")
