"""Which tokens of each sequence a cp rank holds: the contiguous or the zigzag split.

The sequence of T tokens is cut into equal chunks of L tokens:

    contiguous  cp chunks of L = T/cp;     rank r holds chunk r
    zigzag      2cp chunks of L = T/(2cp); rank r holds chunks r and 2cp-1-r

    T = 16, cp = 4, zigzag (L = 2):
        chunk    0  1  2  3  4  5  6  7
        rank     0  1  2  3  3  2  1  0        rank 0: tokens 0-1 and 14-15

Why zigzag (Brandon et al. 2023, "Striped Attention"; torchtitan, Megatron's CP): under
a causal mask, query chunk i attends to key chunks 0..i, so the work of a chunk grows
with its index. Contiguous, rank r does r+1 chunk pairs and rank cp-1 does cp times the
work of rank 0. Zigzag pairs an early chunk with a late one:

    pairs(rank r) = (r + 1) + (2cp - r) = 2cp + 1       the same on every rank

A chunk pair (query chunk i, key chunk j) is one of three kinds (`pair_kind`):
    j > i   skip      entirely in the future: not computed at all
    j == i  diagonal  computed with the causal triangle inside the block
    j < i   full      entirely in the past: computed without a mask

Tokens inside a rank are kept in its chunk order, so its local sequence is
positions(r) = [chunk r, chunk 2cp-1-r] (zigzag); the position embedding, dropout
masks and the loss all index the serial arrays with these positions.
"""
from dataclasses import dataclass

import numpy as np

from minipar.layout import check_split

SKIP, DIAGONAL, FULL = "skip", "diagonal", "full"


def pair_kind(query_chunk, key_chunk):
    """skip | diagonal | full for a (query chunk, key chunk) pair under the causal mask."""
    if key_chunk > query_chunk:
        return SKIP
    return DIAGONAL if key_chunk == query_chunk else FULL


@dataclass(frozen=True)
class ContextSplit:
    """The cut of a T-token sequence over cp ranks; `rank` is this rank's cp coordinate."""
    seq_len: int                 # T, the serial sequence length
    cp: int                      # ranks sharing one sequence
    rank: int = 0                # this rank's index in the cp group
    kind: str = "zigzag"         # zigzag | contiguous

    def __post_init__(self):
        check_split(self.seq_len, self.cp, self.kind)     # layout.py: equal chunks, a known kind

    @property
    def n_chunks(self):
        return 2 * self.cp if self.kind == "zigzag" else self.cp

    @property
    def chunk_len(self):
        """L: tokens per chunk."""
        return self.seq_len // self.n_chunks

    @property
    def local_len(self):
        """T/cp: tokens per rank."""
        return self.seq_len // self.cp

    def chunks(self, r=None):
        """The chunk indices rank r holds, in its local order."""
        r = self.rank if r is None else r
        return (r, 2 * self.cp - 1 - r) if self.kind == "zigzag" else (r,)

    def positions(self, r=None):
        """(T/cp,) int64: the serial positions of rank r's tokens, in its local order."""
        L = self.chunk_len
        return np.concatenate([np.arange(c * L, (c + 1) * L) for c in self.chunks(r)])

    def all_positions(self):
        """(T,) int64: every rank's positions, rank after rank (the order of an all-gather)."""
        return np.concatenate([self.positions(r) for r in range(self.cp)])

    def pairs(self, r=None):
        """Computed (query chunk, key chunk) pairs of rank r: (chunk pairs, of which diagonal)."""
        mine = self.chunks(r)
        kinds = [pair_kind(i, j) for i in mine for j in range(self.n_chunks)]
        return sum(k != SKIP for k in kinds), sum(k == DIAGONAL for k in kinds)
