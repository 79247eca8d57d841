"""Data (minipar/data.py): the reversal task's layout, addressable batches (any slice of
the global batch equals the same rows of the whole), determinism by seed, and the
character-level TextTask on a temporary file. Serial."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipar.data import ReverseTask, TextTask, make_task
from strategies import seeds


pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on


# ----------------------------------------------------------------------------- ReverseTask

@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 9), seed=seeds, step=st.integers(0, 10 ** 6))
def test_reverse_task_layout(k, seed, step):
    task = ReverseTask(k, seed)
    x, y = task.batch(step, np.arange(5))
    assert x.shape == y.shape == (5, 2 * k) == (5, task.seq_len)
    assert x.dtype.kind == y.dtype.kind == "i"
    digits = x[:, :k]
    assert ((digits >= 0) & (digits <= 9)).all() and (x[:, k] == 10).all()        # prompt | separator
    np.testing.assert_array_equal(x[:, k + 1:], digits[:, ::-1][:, :k - 1])       # answer so far
    assert (y[:, :k] == -1).all()                                                  # prompt is not scored
    np.testing.assert_array_equal(y[:, k:], digits[:, ::-1])                       # the separator predicts
    np.testing.assert_array_equal(y[:, :-1][:, k:], x[:, 1:][:, k:])               # y is x shifted by one
    assert ((y != -1).sum(axis=1) == task.targets_per_sample).all()
    assert task.vocab_size == 11


def test_reverse_task_worked_example():
    x, y = ReverseTask(4, seed=0).batch(0, [0])
    d = x[0, :4]
    np.testing.assert_array_equal(x[0], [*d, 10, d[3], d[2], d[1]])
    np.testing.assert_array_equal(y[0], [-1, -1, -1, -1, d[3], d[2], d[1], d[0]])


@settings(max_examples=25, deadline=None)
@given(data=st.data(), seed=seeds, step=st.integers(0, 1000), split=st.sampled_from(["train", "val"]))
def test_any_subset_of_indices_equals_the_same_rows_of_the_full_batch(data, seed, step, split):
    task = ReverseTask(3, seed)
    full_x, full_y = task.batch(step, np.arange(16), split)
    subset = data.draw(st.lists(st.integers(0, 15), min_size=1, max_size=8))      # any order, repeats
    x, y = task.batch(step, np.array(subset), split)
    np.testing.assert_array_equal(x, full_x[subset])
    np.testing.assert_array_equal(y, full_y[subset])


def test_batches_are_determined_by_seed_step_split_and_index():
    a = ReverseTask(6, seed=1)
    x = a.batch(3, np.arange(8))[0]
    np.testing.assert_array_equal(x, ReverseTask(6, seed=1).batch(3, np.arange(8))[0])
    for other in (ReverseTask(6, seed=2).batch(3, np.arange(8))[0], a.batch(4, np.arange(8))[0],
                  a.batch(3, np.arange(8), split="val")[0], a.batch(3, np.arange(8, 16))[0]):
        assert not np.array_equal(x, other)


def test_reverse_task_rejects_no_digits():
    with pytest.raises(ValueError, match="n_digits must be >= 1"):
        ReverseTask(0)


# ----------------------------------------------------------------------------- TextTask

TEXT = "the quick brown fox jumps over the lazy dog. " * 4


def write(tmp_path, text):
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_text_task_vocab_windows_and_split(tmp_path):
    task = TextTask(write(tmp_path, TEXT), seq_len=8, seed=0)
    assert task.itos == sorted(set(TEXT)) and task.vocab_size == len(set(TEXT))
    assert task.decode([task.stoi[c] for c in "lazy dog"]) == "lazy dog"
    train, val = task.ids["train"], task.ids["val"]
    assert task.decode(np.concatenate([train, val])) == TEXT                       # a clean 90/10 cut
    assert len(train) == int(0.9 * len(TEXT))
    for split, ids in (("train", train), ("val", val)):
        x, y = task.batch(2, np.arange(6), split)
        assert x.shape == y.shape == (6, 8)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])                       # next character
        text = task.decode(ids)
        for row_x, row_y in zip(x, y):
            assert task.decode(np.append(row_x, row_y[-1])) in text                # a real window
    assert task.targets_per_sample == 8


def test_text_task_batches_are_addressable_and_seeded(tmp_path):
    path = write(tmp_path, TEXT)
    task = TextTask(path, seq_len=5, seed=3)
    full = task.batch(1, np.arange(10))[0]
    np.testing.assert_array_equal(task.batch(1, np.array([7, 2]))[0], full[[7, 2]])
    np.testing.assert_array_equal(TextTask(path, seq_len=5, seed=3).batch(1, np.arange(10))[0], full)
    assert not np.array_equal(TextTask(path, seq_len=5, seed=4).batch(1, np.arange(10))[0], full)


def test_text_task_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        TextTask(str(tmp_path / "missing.txt"), seq_len=8)
    with pytest.raises(ValueError, match="at least 18 characters"):
        TextTask(write(tmp_path, "abcdefgh"), seq_len=8)
    with pytest.raises(ValueError, match="2 distinct"):
        TextTask(write(tmp_path, "a" * 100), seq_len=8)


def test_text_task_smallest_accepted_text_gives_batches(tmp_path):
    task = TextTask(write(tmp_path, "abcdefghij"), seq_len=4)                      # 2 * (4 + 1) characters
    x, y = task.batch(0, np.arange(2), "val")
    assert task.decode(np.append(x[0], y[0, -1])) == "fghij"                      # the only window


def test_make_task_picks_the_task(tmp_path):
    assert isinstance(make_task(), ReverseTask) and make_task(n_digits=5).k == 5
    task = make_task(write(tmp_path, TEXT), seq_len=7)
    assert isinstance(task, TextTask) and task.seq_len == 7
