"""A Megatron-LM TikTokenizer user's pipeline as real commands: ``tools/train_tokenizer.py`` writes
a tiktoken JSON vocabulary, ``tools/preprocess_data.py`` with
``--tokenizer-type TikTokenizer --tokenizer-model vocab.json`` and Megatron-LM's tiktoken flags, the
trainer on it, a checkpoint that records the options its ids depend on (so a tool given only
``--load`` rebuilds them, and a flag that would change them is refused), and the Hugging Face
export, whose tokenizer gives the trained ids."""

from __future__ import annotations

import pytest

from megatron_slm.checkpoint import read_checkpoint
from megatron_slm.data.tokenizer import build_tokenizer
from tests.functional.pretrain_helpers import run_pretrain, run_tool

pytestmark = pytest.mark.slow
pytest.importorskip("tiktoken")
pytest.importorskip("transformers")

WORDS = "the reference model scores each token and training keeps those that matter".split()
OPTIONS = ("--tiktoken-pattern", "v1", "--tiktoken-num-special-tokens", 16)


def test_tiktokenizer_from_preprocessing_to_export(tmp_path):
    import json

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from megatron_slm.errors import UserError
    from megatron_slm.runtime import plan_load
    from megatron_slm.scoring import ScoreConfig

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 40)))) for _ in range(300)]
    texts[2] = "Numbers 2718, café 🙂 and a <s> inside"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_tool("train_tokenizer", "--input", corpus, "--model-prefix", tmp_path / "tiktoken",
          "--vocab-size", 320, "--tokenizer-type", "TikTokenizer")  # fmt: skip
    vocab = str(tmp_path / "tiktoken.json")
    tok = build_tokenizer(
        "TikTokenizer", vocab, tiktoken={"pattern": "v1", "num_special_tokens": 16}
    )
    flags = ("--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocab, *OPTIONS)
    run_tool("preprocess_data", "--input", corpus, "--output-prefix", tmp_path / "c", *flags,
          "--append-eod")  # fmt: skip
    data = str(tmp_path / "c_text_document")
    dataset = IndexedDataset(data)
    for i in (0, 2):
        np.testing.assert_array_equal(dataset[i], [*tok.tokenize(texts[i]), tok.eod])

    ckpt = str(tmp_path / "ckpt")
    run_pretrain([
        "--data-path", data, *flags, "--model-preset", "tiny", "--seq-length", 32,
        "--micro-batch-size", 2, "--global-batch-size", 4, "--train-iters", 2, "--lr", "1e-3",
        "--eval-interval", 0, "--split", "100,0,0", "--save", ckpt,
    ])  # fmt: skip
    record = read_checkpoint(ckpt).tokenizer
    assert record["type"] == "TikTokenizer" and record["vocab_size"] == tok.vocab_size
    assert record["tiktoken"] == tok.options() and record["tiktoken"]["pattern"] == "v1"

    # --load alone rebuilds the trained ids; a flag that changes them is refused
    plan = plan_load(ScoreConfig(data_prefix=[data], load=ckpt), tokenizer="required")
    assert plan.tokenizer.tokenize(texts[2]) == tok.tokenize(texts[2])
    with pytest.raises(UserError, match="the TikTokenizer's pattern v2 differs from"):
        changed = ScoreConfig(data_prefix=[data], load=ckpt, tiktoken_pattern="v2")
        plan_load(changed, tokenizer="required")

    run_tool("convert_checkpoint", "megatron-to-hf", "--load", ckpt, "--save", tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in texts[:6]:
        assert hf(text).input_ids == tok.tokenize(text), text
    assert hf.eos_token_id == tok.eod
