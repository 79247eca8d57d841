"""Context parallelism: the sequence split over cp ranks for the whole layer.

    split.py           which tokens a cp rank holds: contiguous or zigzag chunks
    online_softmax.py  attention of one query block against one key block, and the
                       log-sum-exp merge of partial results (the math of the ring)
    ring_attention.py  ring attention, forward and backward, over explicit Isend/Irecv
    ulysses.py         DeepSpeed-Ulysses: all-to-all from sequence-split to head-split
    model.py           the cp layer: ContextShard (this rank's chunks, loss, gather) and
                       ContextParallelAttention, which replaces each block's attention core
"""
