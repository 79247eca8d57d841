"""A parity failure names its likely cause (minipar/diagnosis.py), in one line.

Synthetic failing rows, one pattern per classic mistake; the bug zoos check the same
messages on real runs (tests/test_*_bugzoo.py print them with -s).
"""
import numpy as np
import pytest

from minipar import parity
from minipar.diagnosis import depth, likely_cause, nearest
from minipar.engine import Layout

pytestmark = pytest.mark.core

NAMES = ["wte.weight", "wpe.weight"] + [f"blocks.{i}.{layer}.{w}" for i in range(2) for layer in
                                        ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.fc", "mlp.proj")
                                        for w in ("weight", "bias")] + ["ln_f.weight", "ln_f.bias"]
COUNTS = {"grad": len(NAMES), "param": len(NAMES)}


def rows(names, qty="grad", scale=None, ranks=(0, 1)):
    return [(r, qty, n, 0.5, scale) for r in ranks for n in names]


def test_backward_order_puts_the_head_nearest_the_loss():
    assert nearest(NAMES) == "ln_f.bias"
    assert depth("blocks.1.mlp.fc.weight") > depth("blocks.1.ln_2.weight") > depth("blocks.0.mlp.proj.bias")


def test_f_without_all_reduce_is_named():
    """ln_2 of the last block and everything before it differ; mlp.fc and mlp.proj after it agree."""
    before = [n for n in NAMES if depth(n) <= depth("blocks.1.ln_2.weight")]
    cause = likely_cause(rows(before), COUNTS, Layout(tp=2), 2, NAMES)
    assert cause.startswith("f's backward does not all-reduce dL/dx over tp: grad of blocks.1.ln_2")


def test_a_sum_where_a_mean_belongs_gives_its_factor():
    cause = likely_cause(rows(NAMES, scale=4.0), COUNTS, Layout(dp=4), 4, NAMES)
    assert "4x the serial one: summed over the dp=4 ranks instead of averaged" in cause


def test_clipping_norm_not_reduced_over_dp():
    cause = likely_cause(rows(["global"], "grad_norm", 0.7), COUNTS, Layout(dp=2, zero=2), 2, NAMES)
    assert cause.startswith("every gradient agrees but the global gradient norm does not (too small")


def test_the_loss_first_means_the_forward():
    cause = likely_cause(rows(["loss"], "loss") + rows(NAMES), COUNTS, Layout(pp=2), 2, NAMES)
    assert cause.startswith("the loss differs, so the forward pass does (PP:")


def test_the_tied_embedding_alone():
    cause = likely_cause(rows(["wte.weight"]), COUNTS, Layout(pp=2), 2, NAMES)
    assert "the first and last stage each hold part of dL/dwte" in cause


def test_zb_h1_weight_gradients_alone_point_at_the_w_steps():
    rows_ = rows(["blocks.1.mlp.proj.bias", "blocks.1.mlp.proj.weight"], ranks=(1,))
    cause = likely_cause(rows_, COUNTS, Layout(pp=3, schedule="zb-h1"), 3, NAMES)
    assert "a receive buffer reused across micro-batches" in cause


def test_check_raises_one_line_with_cause_and_evidence():
    rows_ = parity.Rows([("grad", "blocks.0.mlp.fc.weight", 1.0), ("param", "blocks.0.mlp.fc.weight", 0.1)],
                        layout=Layout(), scales={("grad", "blocks.0.mlp.fc.weight"): 3.0})
    with pytest.raises(parity.ParityError) as err:
        parity.check(None, rows_, 1e-10, " at step 0", loss=(np.float64(1.0), np.float64(1.0)))
    text = str(err.value)
    assert "\n" not in text and text.startswith("parity failed at step 0: every differing gradient is 3x")
    assert "[grad of 'blocks.0.mlp.fc.weight': rel err 1.000e+00 > tol 1e-10" in text


def test_tolerances_read_as_written():
    assert parity.format_tolerance(1e-5) == "1e-05"
    assert parity.format_tolerance(parity.RUN_TOLERANCE["mixed"]) == "loss 0.01, param 0.1, v 0.1, m 1, grad 1"
