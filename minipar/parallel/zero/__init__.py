"""ZeRO (Rajbhandari et al. 2020): optimizer state, gradients, then parameters sharded over dp.

    partition.py        flat padded buffers, rank r owns chunk r
    shard_optimizer.py  the optimizer step on this rank's chunk, on device or offloaded to host
    base.py             what every stage shares: partition, shard optimizer, collectives, state
    stage0.py           Zero0: whole flat buffers, all-reduce (ZeRO-Offload on plain DP)
    stage1.py           Zero1: the optimizer states cut over dp (reduce-scatter, all-gather)
    stage2.py           Zero2: + the gradients (each bucket reduce-scattered in backward)
    stage3.py           Zero3: + the parameters (gathered and released around each Block)
    stages.py           the stages table and make_zero, which builds the one a Layout asks for
"""
