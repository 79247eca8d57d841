"""Pipeline stages: the GPT's blocks cut into p*v contiguous virtual stages.

With p pipeline ranks and v model chunks per rank there are S = p*v virtual
stages. Chunk c of rank r is virtual stage s = c*p + r (Narayanan et al. 2021),
so a micro-batch's activation visits the ranks round-robin, v times:

    L = 10 blocks, p = 2, v = 2  ->  S = 4 stages of 3 3 2 2 blocks

    stage s      0            1            2            3
    rank r       0            1            0            1
    chunk c      0            0            1            1
    holds        embed        blocks 3-5   blocks 6-7   blocks 8-9
                 blocks 0-2                             ln_f, head, loss

Uneven counts: stage s gets floor(L/S) blocks, plus one for each of the first
L mod S stages (earlier stages get the extra layers). Fewer blocks than stages
is refused: every stage must hold at least one block.

Embedding on virtual stage 0, ln_f + head + criterion on stage S-1. With tied
embeddings the head multiplies by wte^T, so the last stage keeps its own copy of
wte (the same serial name and ShardSpec; each rank built the full model from the
seed, so the copies start equal) and the pipeline sums the two copies' gradients
after backward. Everything a rank does not hold is detached from the model, so
its memory is really freed.
"""
from minipar.layout import check_stages

def split_layers(n_layer, n_stages):
    """Block index ranges of the S virtual stages; earlier stages get the extra blocks.
        split_layers(10, 4) -> [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]"""
    check_stages(n_layer, n_stages)              # layout.py: a block for every stage
    base, extra = divmod(n_layer, n_stages)
    sizes = [base + (s < extra) for s in range(n_stages)]
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def virtual_stage(rank, chunk, p):
    """s = c*p + r: the virtual stage that chunk c of pipeline rank r holds."""
    return chunk * p + rank


def stage_owner(stage, p):
    """(rank, chunk) holding virtual stage s: the inverse of virtual_stage."""
    chunk, rank = divmod(stage, p)
    return rank, chunk


def is_tied(model):
    """Does the head reuse the token embedding (logits = x wte^T)?"""
    return model.cfg.tied_embeddings


class Stage:
    """Virtual stage `index` of `n_stages`: [embed] + its blocks + [ln_f, head, loss].

    It owns no parameters itself: it calls the (narrowed) model's embed / head /
    criterion and holds the list of its blocks, so a tensor-parallel model, which
    has the same interface, is cut the same way."""

    def __init__(self, model, index, n_stages, blocks):
        self.model, self.index, self.n_stages, self.blocks = model, index, n_stages, blocks

    @property
    def is_first(self):
        return self.index == 0

    @property
    def is_last(self):
        return self.index == self.n_stages - 1

    def forward(self, x, key=None, targets=None):
        """x: token ids (b, T) on the first stage, else the previous stage's activation.
        Returns the activation for the next stage; on the last stage the logits, or the
        loss if `targets` are given."""
        if self.is_first:
            x = self.model.embed(x, key)              # (b, T) -> (b, T, C)  [(b, T/tp, C) under SP]
        for block in self.blocks:
            x = block(x, key)                         # (b, T, C) -> (b, T, C)
        if not self.is_last:
            return x
        logits = self.model.head(x)                   # (b, T, V)  [(b, T, V/tp) under TP]
        return logits if targets is None else self.model.criterion(logits, targets)

    __call__ = forward

    def __repr__(self):
        parts = (["embed"] if self.is_first else []) + \
                [f"blocks {self.blocks[0].index}-{self.blocks[-1].index}"] + \
                (["head"] if self.is_last else [])
        return f"Stage({self.index} of {self.n_stages}: {', '.join(parts)})"


def build_stages(model, p, v, rank):
    """The v Stages of pipeline rank `rank`, chunk order; narrows `model` in place to them.

    After this call model.blocks holds only this rank's blocks, and the embedding /
    head modules it does not need are set to None, so model.parameters() is exactly
    this rank's share (the tied wte appearing once, on the first and on the last rank).
    """
    n_stages = p * v
    ranges = split_layers(len(model.blocks), n_stages)
    mine = [virtual_stage(rank, c, p) for c in range(v)]
    stages = [Stage(model, s, n_stages, [model.blocks[i] for i in ranges[s]]) for s in mine]
    # model.embed uses wte and wpe (virtual stage 0); model.head ln_f and lm_head, or wte when tied
    first, last = stages[0].is_first, stages[-1].is_last
    if not first:                                     # drop the references: their arrays are freed
        model.wpe = None
        if not (last and is_tied(model)):
            model.wte = None
    if not last:
        model.ln_f = model.lm_head = None
    model.blocks = [block for stage in stages for block in stage.blocks]
    return stages
