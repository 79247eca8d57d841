"""Expert groups: the data-parallel group split two ways (DeepSpeed-MoE, Megatron-LM).

The dp group (size dp, rank d) of a pipeline stage and tensor rank is cut into dp/ep
expert-parallel groups of ep consecutive dp ranks. Inside one ep group every rank holds
E/ep different experts, so together they hold one copy of every expert; the ranks that
hold the *same* experts (equal d mod ep) form an expert-data-parallel group of size dp/ep:

    dp = 4, ep = 2, E = 4:   d      0      1      2      3
                             ep     {0, 1}        {2, 3}          (color d // ep, key d % ep)
                             edp    {0, 2} {1, 3}                  (color d % ep, key d // ep)
                             holds  e0,e1  e2,e3  e0,e1  e2,e3

Dense parameters are averaged over dp, expert parameters over edp (their gradients come
from the tokens of the whole ep group, see sync.py). Routing statistics (aux loss, capacity)
are over the whole dp group: the serial run's batch is every dp rank's batch.
"""
from minipar.layout import check_experts


class ExpertGroups:
    """ep_group (size ep), edp_group (size dp/ep) and balance (the dp group) of this rank,
    and the experts it holds: [first, first + per_rank)."""

    def __init__(self, dp_group, ep, experts, tp_rank=0):
        check_experts(experts, ep, dp_group.size)      # layout.py: ep divides dp and E, before any Split
        d = dp_group.rank
        self.ep, self.balance, self.tp_rank = ep, dp_group, tp_rank
        # two Splits, collective over the dp group: the group's rank is the coordinate that varies
        self.ep_group = dp_group.split(color=d // ep, key=d % ep, name="ep")
        self.edp_group = dp_group.split(color=d % ep, key=d // ep, name="edp")
        self.per_rank = experts // ep
        self.first = self.ep_group.rank * self.per_rank

    def __repr__(self):
        return (f"ExpertGroups(ep={self.ep}, edp={self.edp_group.size}: this rank holds experts "
                f"{self.first}..{self.first + self.per_rank - 1})")
