"""Dropout masks that every parallel layout reproduces exactly: DropoutKey, Rows, Dropout.

A mask is addressed by (seed, step, global sample index, site), never by rank, so any
data / pipeline slice of the batch draws exactly the rows the serial run drew. Each rank
draws the *full* serial row and keeps the part it holds, so the masks of a sharded run,
assembled, are the serial masks:

    residual stream (B, T, C)   the rows of T this rank's activation holds (`Rows`):
                                all of T serially; T/tp under sequence parallelism,
                                T/cp under context parallelism, T/(cp tp) with both
    attention (B, H, T, T)      this rank's heads under tensor parallelism and its
                                query rows under context parallelism (the attention
                                modules cut those themselves)

Sites: 0 is the embedding, then 3 per block i: 3i+1 and 3i+2 the residual dropouts
after attention and MLP, 3i+3 the attention probabilities.
"""
from dataclasses import dataclass, field

import numpy as np

from minipar import ops
from minipar.layers import Module


@dataclass
class DropoutKey:
    """Addresses every dropout mask by (seed, step, global sample index, site)."""
    seed: int
    step: int
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def keep(self, site, row, p):
        """Boolean keep-mask (B, *row): one full serial row per sample, P(keep) = 1 - p."""
        return np.stack([np.random.default_rng([self.seed, self.step, int(s), site]).random(row) >= p
                         for s in self.samples])     # a loop over samples only, never elements


@dataclass(frozen=True)
class Rows:
    """Which positions of the serial T axis an activation's rows are.

    positions: the serial positions of the tokens this rank runs (context parallelism's
    chunks, a host index array; None = 0 .. T-1). chunk of chunks: the equal part of those
    tokens the activation holds (sequence parallelism cuts them over tp; 0 of 1 = all)."""
    positions: np.ndarray = None
    chunk: int = 0
    chunks: int = 1

    def index(self, t):
        """The serial positions of an activation's t rows: a slice, or an index array."""
        mine = slice(self.chunk * t, (self.chunk + 1) * t)
        return mine if self.positions is None else self.positions[mine]


class Dropout(Module):
    """Dropout on the residual stream at mask site `site` with probability p.

    The mask is drawn for the whole serial row (seq_len, C) and cut at `rows`, the
    positions the activation x (B, t, C) holds. The first t rows of a draw of seq_len
    rows are a draw of t rows, so serially (rows = all of T) this is the plain mask."""

    def __init__(self, p, site, seq_len):
        super().__init__()
        self.p, self.site, self.seq_len = p, site, seq_len
        self.rows = Rows()           # sequence / context parallelism declare their cut here

    def forward(self, x, key):
        if self.p == 0.0 or not self.training:
            return x
        full = key.keep(self.site, (self.seq_len,) + x.shape[2:], self.p)   # (B, seq_len, C) serial rows
        return ops.dropout(x, full[:, self.rows.index(x.shape[1])], self.p)  # (B, t, C): my rows
