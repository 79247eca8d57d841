"""Training data, generated in code: nothing is downloaded.

Two tasks share one interface, `task.batch(step, indices, split)`:

* `ReverseTask` (the built-in task): a prompt of k random digits, a separator,
  then the same digits reversed. The model must learn to attend backwards
  through the prompt. Only the k answer tokens are scored (targets elsewhere
  are -1 = ignored), so chance accuracy is 1/10 and a trained GPT reaches ~100%.

      tokens:   3 1 4 1 5 9 2 6 | 6 2 9 5 1 4 1 3
      targets:  - - - - - - - - 6 2 9 5 1 4 1 3       (y = tokens[1:]: position i predicts token i+1)

* `TextTask` (`--data FILE`): character-level language modelling on any text.

A batch is addressable: sample i of step s is a pure function of (seed, split,
s, i). Any data-parallel rank or pipeline micro-batch takes exactly its slice of
the global batch, and every sample carries the same number of scored targets,
so the mean of equal-sized slice means is the global mean.
"""
import os

import numpy as np

SPLITS = {"train": 0, "val": 1}


def _draw(seed, split, step, indices, fn):
    """Stack fn(rng) over samples, each with its own generator keyed by (seed, split, step, i)."""
    return np.stack([fn(np.random.default_rng([seed, SPLITS[split], step, int(i)])) for i in indices])


class ReverseTask:
    """Reverse a k-digit prompt: vocab = 10 digits + separator."""

    def __init__(self, n_digits=8, seed=0):
        if n_digits < 1:
            raise ValueError(f"n_digits must be >= 1, got {n_digits}")
        self.k, self.seed = n_digits, seed
        self.vocab_size = 11
        self.seq_len = 2 * n_digits           # inputs are tokens[:-1] of a 2k+1 sequence
        self.targets_per_sample = n_digits

    def batch(self, step, indices, split="train"):
        """(x, y) for samples `indices` of the global batch of `step`: (n, 2k) int64 each."""
        digits = _draw(self.seed, split, step, indices, lambda r: r.integers(0, 10, self.k))   # (n, k)
        sep = np.full((len(digits), 1), 10)
        tokens = np.concatenate([digits, sep, digits[:, ::-1]], axis=1)    # (n, 2k+1)
        x, y = tokens[:, :-1].copy(), tokens[:, 1:].copy()                # (n, 2k) each
        y[:, : self.k] = -1                                                # prompt and separator are not scored
        return x, y


class TextTask:
    """Character-level text: random windows of `seq_len + 1` characters."""

    def __init__(self, path, seq_len, seed=0):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        chars = sorted(set(text))
        if len(text) < 2 * (seq_len + 1) or len(chars) < 2:
            raise ValueError(f"{path}: need at least {2 * (seq_len + 1)} characters and 2 distinct ones")
        self.itos = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        ids = np.array([self.stoi[c] for c in text], dtype=np.int64)
        cut = int(0.9 * len(ids))
        cut = min(max(cut, seq_len + 1), len(ids) - seq_len - 1)
        self.ids = {"train": ids[:cut], "val": ids[cut:]}
        self.seed, self.seq_len, self.vocab_size = seed, seq_len, len(chars)
        self.targets_per_sample = seq_len

    def batch(self, step, indices, split="train"):
        data = self.ids[split]
        starts = _draw(self.seed, split, step, indices, lambda r: r.integers(0, len(data) - self.seq_len))
        window = starts[:, None] + np.arange(self.seq_len + 1)               # (n, T+1)
        tokens = data[window]
        return tokens[:, :-1], tokens[:, 1:]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)


def make_task(data=None, seq_len=None, seed=0, n_digits=8):
    """The built-in reversal task, or a character-level task over the file `data`."""
    if data is None:
        return ReverseTask(n_digits, seed)
    return TextTask(data, seq_len or 64, seed)
