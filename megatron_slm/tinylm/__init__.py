"""Tiny-LM recipes (RethinkTinyLM, arXiv 2402.02791): compact tokenizer, parameter inheritance,
resampling.

Compact tokenizer: a large vocabulary spends a small model's parameters on embeddings. The path::

    train a large SentencePiece model        tools/train_tokenizer.py
    count its ids over the tokenized corpus   tools/compact_tokenizer.py count             counts.py
    prune it to the N most useful pieces      tools/compact_tokenizer.py prune             prune.py
    re-tokenize the corpus with the new model tools/preprocess_data.py
    carry a checkpoint's embeddings over      tools/compact_tokenizer.py remap-checkpoint  remap.py

Its modules: ``counts`` (id frequencies over indexed datasets, with the tokenizer's identity),
``spm`` (reading/writing SentencePiece model protos, the BPE merge simulation), ``prune``
(choosing the kept pieces, writing the small model), ``idmap`` (the new id -> old id map),
``report`` (coverage, compression cost, embedding parameters saved), ``remap`` (checkpoint
embedding and output rows), ``compact`` (the steps as functions of their configs),
``compact_config`` (the tool's typed settings).

Parameter inheritance (``tools/inherit_parameters.py``): ``inheritance`` and its ``inheritance_*``
and ``importance`` modules.
"""
