"""Tensor parallelism (Megatron-LM) and its two companions.

    megatron.py  f and g, column- and row-parallel Linear, the split block and GPT
    sequence.py  sequence parallelism: LayerNorm and dropout on T/tp, all-gather and
                 reduce-scatter in place of g's all-reduce
    vocab.py     the vocabulary-parallel embedding and cross-entropy
"""
