"""Dispatch and combine: tokens travel to the ranks that hold their experts and back.

On each rank the MoE layer (moe.py) has sorted its kept routing slots by expert, so the
rows for the experts of ep rank r are one contiguous block. One layer, ep = 2, E = 4:

    rank 0 rows   [ e0 e0 e1 | e2 e3 e3 ]       rank 1 rows   [ e0 | e1 e2 e2 e3 ]
                   to rank 0   to rank 1                        to 0   to rank 1
    counts per (destination, expert), exchanged first (all_to_all of E ints):
                   send[r, j] = rows for expert r*E/ep + j;   recv[s, j] = rows from s for my expert j
    dispatch       Alltoallv(rows, send.sum(1) -> recv.sum(1))      received source-major
    regroup        expert-major (expert j: from source 0, then 1, ...: global token order)
    experts        FFN_j on its rows (GroupedLinear)
    ungroup        back to source-major
    combine        Alltoallv(back, recv.sum(1) -> send.sum(1))      the inverse: same order as sent

Backward is the mirror image: AllToAll's backward is the all-to-all with the counts swapped,
so each gradient row returns along the path its activation came.

Traffic per MoE layer and micro-batch, from rank me (ledger "all_to_all_v", R = C * itemsize):
    forward  (sum_{r != me} send_r + sum_{s != me} recv_s) * R     dispatch + combine
    backward the same again                                       their mirrors
plus one all_to_all of the E int64 counts, (ep-1)/ep * 8E bytes ("all_to_all").
"""
import numpy as np

from minipar.autograd import Function
from minipar.layers import Parameter, ShardSpec
from minipar.moe import Gather, MoE


class AllToAll(Function):
    """Variable all-to-all of rows over `group`: forward sends send[r] rows to rank r,
    backward sends the gradients back the same way (counts swapped)."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        # all-to-all-v over ep: send[r] rows of C to ep rank r, recv[s] rows back from rank s
        return group.all_to_all_v(x, send, recv)                  # (sum(recv), C)

    @staticmethod
    def backward(ctx, g):
        # all-to-all-v over ep, the mirror: the gradient of every received row to its source
        return ctx.group.all_to_all_v(g, ctx.recv, ctx.send)      # (sum(send), C)


def expert_shard(full, lo, hi, groups):
    """Experts [lo, hi) of a serial stacked expert Parameter (E, ...) as a new Parameter
    (E/ep, ...); replicated over tp, so only tp rank 0 counts it in the gradient norm."""
    p = Parameter(full.data[lo:hi].copy(), name=full.name)              # (E/ep, ...) this rank's experts
    p.spec = ShardSpec(full.name, full.data.shape, 0, lo, hi, norm_owner=groups.tp_rank == 0)
    return p


class ExpertParallelMoE(MoE):
    """This rank's share of a serial MoE layer: the router (replicated) and E/ep experts.

    Expert parameters are the serial arrays' slice [first, first + E/ep) along axis 0
    (ShardSpec axis 0), so parity compares them with spec.take(serial)."""

    def __init__(self, serial, groups):
        lo, hi = groups.first, groups.first + groups.per_rank
        experts = [expert_shard(full, lo, hi, groups) for full in serial.expert_parameters()]
        super().__init__(serial.router, experts, serial.k, serial.coef, serial.capacity_factor)
        self.balance = groups.balance                         # routing statistics over dp
        self.group, self.per_rank = groups.ep_group, groups.per_rank
        self.exchange = None                                  # (send, recv) row counts per ep rank, last forward

    def exchanged_rows(self):
        """(rows sent to, rows received from) the other ep ranks by the last dispatch."""
        send, recv = self.exchange
        me = self.group.rank
        return int(send.sum() - send[me]), int(recv.sum() - recv[me])

    def experts(self, rows, per_expert):
        """rows (S, C) sorted by expert -> their FFN outputs, in the same order."""
        send = per_expert.reshape(self.group.size, self.per_rank).astype(np.int64)   # (ep, E/ep)
        if self.group.size == 1:
            self.exchange = (send.sum(axis=1), send.sum(axis=1))
            return self.ffn(rows, per_expert)
        # all-to-all over ep: E int64 counts, block r = my rows for rank r's experts
        recv = self.group.all_to_all(send)                    # (ep, E/ep) [source, my expert]
        self.exchange = (send.sum(axis=1), recv.sum(axis=1))
        x = AllToAll.apply(rows, send.sum(axis=1), recv.sum(axis=1), self.group)   # (R, C) by source
        starts = np.concatenate([[0], np.cumsum(recv.reshape(-1))])[:-1].reshape(recv.shape)   # (ep, E/ep)
        perm = np.concatenate([np.arange(starts[s, j], starts[s, j] + recv[s, j])
                               for j in range(self.per_rank) for s in range(self.group.size)]
                              + [np.zeros(0, np.int64)]).astype(np.int64)           # expert-major
        y = self.ffn(Gather.apply(x, perm), recv.sum(axis=0))   # (R, C) by expert
        back = Gather.apply(y, self.source_order(perm))         # (R, C) by source again
        return AllToAll.apply(back, recv.sum(axis=1), send.sum(axis=1), self.group)   # (S, C)


    @staticmethod
    def source_order(perm):
        """The inverse of the expert-major regrouping: rows return in the order they arrived,
        so the combine all-to-all hands each source its rows in the order it dispatched them."""
        return np.argsort(perm)


def shard_experts(model, groups):
    """Replace every MoE layer of `model` (the serial GPT) with this rank's ExpertParallelMoE;
    returns the model and the expert parameters (averaged over edp, not dp)."""
    experts = []
    for block in model.blocks:
        if isinstance(block.mlp, MoE):
            block.mlp = ExpertParallelMoE(block.mlp, groups)
            experts += block.mlp.expert_parameters()
    return model, experts
