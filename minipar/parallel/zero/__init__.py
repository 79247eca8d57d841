"""ZeRO (Rajbhandari et al. 2020): optimizer state, gradients, then parameters sharded over dp.

    partition.py        flat padded buffers, rank r owns chunk r
    shard_optimizer.py  the optimizer step on this rank's chunk, on device or offloaded to host
    stages.py           ZeRO-1, 2 and 3 as gradient sync and optimizer
"""
