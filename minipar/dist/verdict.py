"""Collective verdicts: every rank reaches the same pass/fail, so a failure never deadlocks.

Under MPI a plain `assert` that fails on one rank leaves the others waiting in
their next collective forever. A verdict first agrees on the outcome (one
all-reduce of a failure flag over the group), and if any rank failed, EVERY
rank raises the same VerdictError naming the failing ranks and their messages.
"""
import numpy as np

from minipar.backend import to_host

TINY = 1e-300  # floor for the scale in max_rel_err, so an all-zero expectation still works


class VerdictError(AssertionError):
    """Raised on every rank of a group at once: the ranks agree the check failed."""


def agree(group, ok, message):
    """Pass if `ok` on every rank of group; else raise VerdictError on all of them."""
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


def _abs_err_and_scale(got, expected):
    """(max|got - expected|, max(max|expected|, TINY)) in float64, on the host."""
    got = np.asarray(to_host(got), dtype=np.float64)
    expected = np.asarray(to_host(expected), dtype=np.float64)
    if expected.size == 0:
        return 0.0, TINY
    return float(np.max(np.abs(got - expected))), max(float(np.max(np.abs(expected))), TINY)


def max_rel_err(got, expected):
    """max|got - expected| / max(max|expected|, TINY): a norm-wise relative error.

    One scale for the whole array (its largest magnitude), so elements near zero
    do not blow the error up; all-zero arrays give 0, a NaN gives NaN."""
    abs_err, scale = _abs_err_and_scale(got, expected)
    return abs_err / scale


def assert_close(group, name, got, expected, rtol, atol=0.0):
    """Collective check on every rank: max|got - expected| <= atol + rtol * max|expected|.
    Returns this rank's max_rel_err (inf on a shape mismatch)."""
    __tracebackhide__ = True
    if np.shape(got) != np.shape(expected):
        err, ok = float("inf"), False
        why = f"shape {np.shape(got)} != expected {np.shape(expected)}"
    else:
        abs_err, scale = _abs_err_and_scale(got, expected)
        err, ok = abs_err / scale, abs_err <= atol + rtol * scale  # ok is False for NaN
        why = (f"max rel err {err:.3e} > rtol {rtol:g}" + (f" + atol {atol:g}" if atol else "")
               + f" (max abs err {abs_err:.3e}, shape {np.shape(got)})")
    agree(group, ok, f"{name}: {why}")
    return err
