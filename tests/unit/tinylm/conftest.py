"""Small SentencePiece models trained on the sample corpus, and counts of their ids over it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SAMPLE = os.path.join(REPO, "examples", "sample_data", "clean.jsonl")


def sample_texts() -> list[str]:
    with open(SAMPLE) as f:
        return [json.loads(line)["text"] for line in f]


def _train(root, name, vocab, model_type, **options):
    from megatron_slm.data.tokenizer import train_sentencepiece

    texts = sample_texts()
    path = train_sentencepiece(texts[:-20], str(root / name), vocab, model_type, **options)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    counts = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for ids in sp.encode(texts[:-20]):
        np.add.at(counts, ids, 1)
    return {"model": path, "counts": counts, "sp": sp, "heldout": texts[-20:]}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """``bpe``: 1000 pieces, identity normalization (exact round trip); ``unigram``: 800 pieces
    with the default NFKC normalization and a user-defined piece."""
    root = tmp_path_factory.mktemp("spm")
    return {
        "bpe": _train(root, "bpe", 1000, "bpe"),
        "unigram": _train(
            root,
            "unigram",
            800,
            "unigram",
            normalization_rule_name="nmt_nfkc",
            user_defined_symbols=["<sep>"],
        ),
    }
