"""ProcessGrid: the dp x pp x cp x tp layout of the ranks, and one Group per axis.

Rank numbering, tp fastest, then cp, then pp, then dp (Megatron-LM's order puts
cp between tp and dp): the ranks of a tensor-parallel group are neighbours, which
on real clusters means the same node and its fast links, since TP talks most (an
all-reduce of b*s*h per layer, twice); the cp ring comes next (a K/V block per
ring step per layer, overlapped with attention compute) and takes the next-nearest
ranks; pipeline neighbours exchange one activation per micro-batch, and dp talks
once per step, so they can span nodes:

    rank = ((d * pp + p) * cp + c) * tp + t        d < dp, p < pp, c < cp, t < tp

With cp = 1 this is the seed's (d * pp + p) * tp + t. Example dp=2, pp=2, tp=2 (8 ranks):

             pipeline stage p=0      pipeline stage p=1
    d = 0    ranks 0 1  (t = 0 1)    ranks 2 3
    d = 1    ranks 4 5               ranks 6 7

    tp groups (same d, p):  {0,1} {2,3} {4,5} {6,7}
    pp groups (same d, t):  {0,2} {1,3} {4,6} {5,7}
    dp groups (same p, t):  {0,4} {1,5} {2,6} {3,7}
    mp groups (same d):     {0,1,2,3} {4,5,6,7}        one full model replica
    embed groups:           first and last stage of each pp group, pp > 1 only:
                            {0,2} {1,3} {4,6} {5,7}    they sum the tied embedding's grads

Example dp=2, cp=2, tp=2 (8 ranks): rank = (d*2 + c)*2 + t

    tp groups (same d, c):  {0,1} {2,3} {4,5} {6,7}
    cp groups (same d, t):  {0,2} {1,3} {4,6} {5,7}    the ring of one sequence's chunks
    dp groups (same c, t):  {0,4} {1,5} {2,6} {3,7}
    dp_cp groups (same t):  {0,2,4,6} {1,3,5,7}        gradient sync and ZeRO shards (dp x cp)

Context parallelism splits the tokens of the same samples over cp: a replicated
weight's gradient is a partial sum over the cp ranks' tokens as well as over the
dp ranks' samples, so gradients are averaged over dp x cp (`dp_cp_group`, as
Megatron folds cp into its data-parallel group); ZeRO shards over it too. With
cp = 1, dp_cp_group IS dp_group (the same object), so nothing else changes.

All sub-groups are made once, here, with Split, and passed explicitly to the
code that needs them; there is no global grid.
"""
from minipar.comm.group import Group
from minipar.layout import check_grid


def grid_rank(d, p, t, pp, tp, c=0, cp=1):
    """The rank at grid coordinates (d, p, c, t)."""
    return ((d * pp + p) * cp + c) * tp + t


def grid_coords_cp(rank, pp, cp, tp):
    """(d, p, c, t) of a rank: the inverse of grid_rank."""
    rest, t = divmod(rank, tp)
    rest, c = divmod(rest, cp)
    d, p = divmod(rest, pp)
    return d, p, c, t


def grid_coords(rank, pp, tp):
    """(d, p, t) of a rank of a grid without cp: the inverse of grid_rank."""
    d, p, _, t = grid_coords_cp(rank, pp, 1, tp)
    return d, p, t


def default_layout(world_size):
    """A (dp, pp, tp) that shows off every axis the size allows:
    tp=2 from 4 ranks on, pp=2 too from 8 on, dp takes the rest.
        1 -> (1,1,1)   2 -> (2,1,1)   4 -> (2,1,2)   8 -> (2,2,2)   16 -> (4,2,2)   6 -> (3,1,2)"""
    tp = 2 if world_size >= 4 and world_size % 2 == 0 else 1
    pp = 2 if world_size >= 8 and world_size % (2 * tp) == 0 else 1
    return world_size // (pp * tp), pp, tp


class ProcessGrid:
    """dp x pp x cp x tp grid over `world` (any Group).

    Sizes: dp, pp, cp, tp. This rank's coordinates: dp_rank, pp_rank, cp_rank, tp_rank.
    Groups: tp_group, cp_group, pp_group, dp_group, dp_cp_group (gradient sync: dp x cp),
    mp_group (pp x tp: one model replica for one sequence chunk), embed_group (also `embed`)."""

    def __init__(self, world, dp, pp, tp, cp=1):
        check_grid(world.size, dp, pp, tp, cp)   # layout.py, before any collective: every rank raises alike
        self.world, self.dp, self.pp, self.tp, self.cp = world, dp, pp, tp, cp
        self.dp_rank, self.pp_rank, self.cp_rank, self.tp_rank = grid_coords_cp(world.rank, pp, cp, tp)
        d, p, c, t = self.dp_rank, self.pp_rank, self.cp_rank, self.tp_rank
        # each Split is collective over world; a group's color is the coordinates it shares,
        # its key the coordinate that varies, so a group's rank IS that coordinate
        self.tp_group = world.split(color=(d * pp + p) * cp + c, key=t, name="tp")
        self.pp_group = world.split(color=(d * cp + c) * tp + t, key=p, name="pp")
        self.dp_group = world.split(color=(p * cp + c) * tp + t, key=d, name="dp")
        self.mp_group = world.split(color=d * cp + c, key=p * tp + t, name="mp")
        self.cp_group = self.dp_cp_group = None
        if cp > 1:
            self.cp_group = world.split(color=(d * pp + p) * tp + t, key=c, name="cp")
            self.dp_cp_group = world.split(color=p * tp + t, key=d * cp + c, name="dp_cp")
        else:
            self.cp_group = Group.single(world.ledger, world.algorithm, world.direct).using(name="cp")
            self.dp_cp_group = self.dp_group
        # tied embedding: the first and last stage of each pipeline (skip when pp == 1)
        self.embed_group = None
        if pp > 1:
            is_end = p in (0, pp - 1)
            self.embed_group = world.split(color=(d * cp + c) * tp + t if is_end else Group.UNDEFINED,
                                           key=p, name="embed")

    @property
    def embed(self):
        """The embed group (first + last stage of this pipeline), None if pp == 1 or a middle stage."""
        return self.embed_group

    @property
    def is_first_stage(self):
        return self.pp_rank == 0

    @property
    def is_last_stage(self):
        return self.pp_rank == self.pp - 1

    @property
    def next_rank(self):
        """pp-group rank of the next pipeline stage, None on the last stage."""
        return None if self.is_last_stage else self.pp_rank + 1

    @property
    def prev_rank(self):
        """pp-group rank of the previous pipeline stage, None on the first stage."""
        return None if self.is_first_stage else self.pp_rank - 1

    def rank_of(self, d, p, t, c=0):
        """Rank in `world` of grid coordinates (d, p, c, t)."""
        return grid_rank(d, p, t, self.pp, self.tp, c, self.cp)

    def describe(self):
        """A table: which rank holds which (d, p, c, t), and its tp / cp / pp / dp group members."""
        n = self.dp * self.pp * self.cp * self.tp
        lines = [f"ProcessGrid dp={self.dp} pp={self.pp} tp={self.tp}"
                 + (f" cp={self.cp}" if self.cp > 1 else "") + f" over {n} ranks "
                 + ("(rank = (d*pp + p)*tp + t)" if self.cp == 1 else "(rank = ((d*pp + p)*cp + c)*tp + t)"),
                 f"{'rank':>4} {'world':>5} {'d':>2} {'p':>2} {'c':>2} {'t':>2}   "
                 f"{'tp group':<12} {'cp group':<12} {'pp group':<12} {'dp group'}"]
        for rank in range(n):
            d, p, c, t = grid_coords_cp(rank, self.pp, self.cp, self.tp)
            tp_members = [self.rank_of(d, p, i, c) for i in range(self.tp)]
            cp_members = [self.rank_of(d, p, t, i) for i in range(self.cp)]
            pp_members = [self.rank_of(d, i, t, c) for i in range(self.pp)]
            dp_members = [self.rank_of(i, p, t, c) for i in range(self.dp)]
            lines.append(f"{rank:>4} {self.world.ranks[rank]:>5} {d:>2} {p:>2} {c:>2} {t:>2}   "
                         + " ".join(f"{str(m).replace(' ', ''):<12}"
                                    for m in (tp_members, cp_members, pp_members, dp_members)).rstrip())
        return "\n".join(lines)

    def __repr__(self):
        return (f"ProcessGrid(dp={self.dp}, pp={self.pp}, cp={self.cp}, tp={self.tp}; this rank d={self.dp_rank} "
                f"p={self.pp_rank} c={self.cp_rank} t={self.tp_rank})")
