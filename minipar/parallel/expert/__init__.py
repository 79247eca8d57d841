"""Expert parallelism: MoE experts spread over an expert-parallel group carved out of dp.

    groups.py    ep and edp groups from the dp group; which experts a rank holds
    dispatch.py  the all-to-all Function and the expert-parallel MoE layer (shard_experts)
    sync.py      gradient sync: dense params over dp, expert params over edp
"""
