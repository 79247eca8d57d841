"""minipar/layout.py from the library's side: the rules the train job's flags meet are the
ones an Engine, a schedule, a context split or the expert sync meets, with the same words.
(The flags' side, at the world size where each rule refuses: tests/test_bad_inputs.py.)"""
import pytest

from minipar import layout
from minipar.data import ReverseTask
from minipar.engine import Engine, Layout
from minipar.layout import LayoutError, validate
from minipar.nn import GPTConfig
from minipar.parallel.context.split import ContextSplit
from minipar.parallel.pipeline.schedules import make_schedule

pytestmark = pytest.mark.core

TASK = ReverseTask(4)


def tiny(**kw):
    return GPTConfig(**{**dict(vocab_size=16, seq_len=TASK.seq_len, n_layer=2, n_head=2, d_model=16), **kw})


def test_a_layout_error_is_a_value_error_of_one_line():
    with pytest.raises(ValueError) as info:
        validate(tiny(), Layout(dp=2), 1)
    assert isinstance(info.value, LayoutError) and "\n" not in str(info.value)
    validate(tiny(), Layout(), 1, 8)                       # the serial layout runs


@pytest.mark.parametrize("lay, words", [
    (Layout(zero=4), "--zero 4: the ZeRO stage must be 0, 1, 2 or 3"),
    (Layout(ep=2), "--ep 2 needs a mixture of experts"),
    (Layout(virtual_stages=2), "--virtual-stages 2 needs --schedule interleaved"),
    (Layout(schedule="pipedream"), "--schedule 'pipedream' is unknown"),
    (Layout(cp_algo="stripes"), "--cp-algo 'stripes' is unknown"),
    (Layout(micro_batches=0), "--micro-batches 0 must be an integer >= 1"),
])
def test_the_engine_refuses_what_the_flags_refuse(lay, words, device):
    with pytest.raises(LayoutError, match=words):
        Engine(tiny(), lay, device=device)


def test_the_batch_rule_counts_the_serial_oracles_ranks():
    layout.check_batch(8, Layout(micro_batches=2, serial_of_dp=2))
    with pytest.raises(LayoutError, match="--batch-size 6 does not split into --dp 1 x --micro-batches 2 "
                                          "x serial_of_dp 2"):
        layout.check_batch(6, Layout(micro_batches=2, serial_of_dp=2))
    with pytest.raises(LayoutError, match="serial_of_dp=0 must be an integer >= 1"):
        layout.check_batch(8, Layout(serial_of_dp=0))


def test_the_strategies_call_the_same_rules():
    with pytest.raises(LayoutError, match="cp_split 'stripes' is unknown"):
        ContextSplit(16, 2, 0, "stripes")
    with pytest.raises(LayoutError, match="--virtual-stages 2 needs --schedule interleaved"):
        make_schedule("1f1b", 4, 8, v=2)
    with pytest.raises(LayoutError, match="--zero 3 with --experts 4"):     # parallel/expert/sync.py's ExpertZero
        layout.check_zero(Layout(dp=2, zero=3), experts=4)
    layout.check_zero(Layout(dp=2, zero=3))


def test_pipeline_message_tags_stay_below_the_ring_tag():
    layout.check_message_tags(2, 8000)                 # the last tag: 2 * (7999 * 2 + 1) + 1 = 31999
    layout.check_message_tags(1, 10 ** 6)              # no pipeline, no messages
    with pytest.raises(LayoutError, match="use at most --micro-batches 8000"):
        layout.check_message_tags(2, 8001)
