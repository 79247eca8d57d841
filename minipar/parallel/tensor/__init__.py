"""Tensor parallelism (Megatron-LM) and its two companions.

    megatron.py  f and g, column- and row-parallel Linear, the split attention, MLP and
                 embedding, and shard_tensor_parallel, which narrows the serial GPT in place
    sequence.py  sequence parallelism: LayerNorm, wpe and dropout on T/tp, all-gather and
                 reduce-scatter in place of g's all-reduce
    vocab.py     the vocabulary-parallel lookup, cross-entropy and argmax
"""
