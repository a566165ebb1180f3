"""--fim-data: fill-in-the-middle samples (data/fim.py) with a real Hugging Face tokenizer that has
the sentinel tokens. Each rewritten document reads back as its own text (prefix + middle + suffix,
character for character) in PSM or SPM layout; the rates hold; fragments split on a token;
documents with the no-FIM prefix stay; a sample keeps its length (cut, or FIM-padded with those
labels masked); the rewrite depends on the sample's index only; and the trainer's flags build it
into every split, refusing the setups it cannot serve."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from megatron_slm.errors import ConfigError

SENTINELS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<file_sep>"]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "import os\nprint(os.getcwd())\n",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_slm.data.tokenizer import HuggingFaceTokenizer

    path = str(tmp_path_factory.mktemp("fim_tok"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>", *SENTINELS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CODE * 8, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)
    return HuggingFaceTokenizer(path)


def _transform(tokenizer, rate=1.0, spm=0.0, split=None, fragment=None, no_prefix=None):
    from megatron_slm.data.fim import FimSettings, FimTokens, FimTransform, token_id

    ids = [token_id(tokenizer, t, "--x") for t in SENTINELS]
    tokens = FimTokens(*ids[:4], eod=tokenizer.eod, split=ids[4] if split else None)
    return FimTransform(FimSettings(rate, spm, tokens, fragment, no_prefix), tokenizer, seed=5), ids


def _sample(tokenizer, texts, length=None):
    ids = []
    for text in texts:
        ids += tokenizer.tokenize(text) + [tokenizer.eod]
    return np.array(ids[:length] if length else ids, dtype=np.int64)


def _documents(tokens, eod):
    out, start = [], 0
    for end in [*np.flatnonzero(tokens == eod), len(tokens)]:
        out.append(tokens[start:end])
        start = end + 1
    return out


def _read_back(tokenizer, doc, ids):
    """(layout, prefix + middle + suffix text) of one rewritten document."""
    prefix, middle, suffix = ids[:3]
    doc = list(doc)
    decode = tokenizer.detokenize
    if doc[:2] == [prefix, suffix]:  # SPM: <prefix> <suffix> S <middle> P M (P and M adjoin)
        m = doc.index(middle)
        return "spm", decode(doc[m + 1 :]) + decode(doc[2:m])
    assert doc[0] == prefix and doc.count(suffix) == doc.count(middle) == 1
    s, m = doc.index(suffix), doc.index(middle)
    assert s < m
    return "psm", decode(doc[1:s]) + decode(doc[m + 1 :]) + decode(doc[s + 1 : m])


@pytest.mark.parametrize("spm", [0.0, 1.0])
def test_every_document_reads_back_as_its_text(tokenizer, spm):
    fim, ids = _transform(tokenizer, spm=spm)
    sample = _sample(tokenizer, CODE)
    for index in range(20):
        out = fim(sample, index)
        assert len(out) == len(sample)  # cut or padded to the sample's length
        docs = _documents(out[out != ids[3]], tokenizer.eod)
        # Re-tokenized parts may come out longer: the sample is then cut, and its last
        # document (not followed by its end-of-document token) is partial.
        complete = docs[:-1]
        assert len(complete) >= len(CODE) - 1
        for text, doc in zip(CODE, complete):
            layout, read = _read_back(tokenizer, doc, ids)
            assert read == text
            if doc[1] != ids[2]:  # (PSM with an empty prefix starts as SPM does)
                assert layout == ("spm" if spm else "psm")


def test_rates_identity_and_the_index(tokenizer):
    sample = _sample(tokenizer, CODE)
    fim, ids = _transform(tokenizer, rate=0.0)
    assert np.array_equal(fim(sample, 3), sample)
    fim, ids = _transform(tokenizer, rate=0.5, spm=0.5)
    rewritten, spm = 0, 0
    for index in range(200):
        for doc in _documents(fim(sample, index), tokenizer.eod)[: len(CODE) - 1]:
            if len(doc) and doc[0] == ids[0]:
                rewritten += 1
                spm += int(doc[1] == ids[2])
    n = 200 * (len(CODE) - 1)
    assert 0.44 < rewritten / n < 0.56 and 0.4 < spm / rewritten < 0.6  # (about 5 sigma)
    assert np.array_equal(fim(sample, 7), fim(sample, 7))  # the index alone decides
    assert sum(not np.array_equal(fim(sample, 7), fim(sample, i)) for i in range(8, 20)) > 8


def test_length_is_kept_by_cutting_or_padding(tokenizer):
    fim, ids = _transform(tokenizer)
    # A document spelled one character per token re-tokenizes shorter: the sample is padded.
    spelled = [i for ch in CODE[0] for i in tokenizer.tokenize(ch)] + [tokenizer.eod]
    short = np.array(spelled, dtype=np.int64)
    for index in range(10):
        out = fim(short, index)
        pads = int((out == ids[3]).sum())
        assert len(out) == len(short) and pads > 0 and (out[-pads:] == ids[3]).all()
        assert _read_back(tokenizer, out[: -pads - 1], ids)[1] == CODE[0]
    cut = _sample(tokenizer, CODE, length=25)  # the last document cut mid-way
    assert all(len(fim(cut, i)) == 25 for i in range(10))


def test_fragments_and_the_no_fim_prefix(tokenizer):
    fim, ids = _transform(tokenizer, split=True, fragment=1.0)
    sep = ids[4]
    repo = []
    for text in CODE[:3]:
        repo += tokenizer.tokenize(text) + [sep]
    sample = np.array(repo[:-1] + [tokenizer.eod], dtype=np.int64)
    out = fim(sample, 0)
    fragments = [f for f in np.split(out, np.flatnonzero(out == sep)) if len(f)]
    assert len(fragments) == 3  # (the last one cut: the rewritten sample came out longer)
    for text, fragment in zip(CODE, fragments[:2]):
        fragment = fragment[fragment != sep]
        fragment = fragment[(fragment != tokenizer.eod) & (fragment != ids[3])]
        assert _read_back(tokenizer, fragment, ids)[1] == text
    keep, _ = _transform(tokenizer, no_prefix="import")
    sample = _sample(tokenizer, [CODE[3], CODE[0]])
    docs = _documents(keep(sample, 1), tokenizer.eod)
    assert np.array_equal(docs[0], tokenizer.tokenize(CODE[3])) and docs[1][0] == ids[0]


def test_the_trainer_builds_it_into_every_split(tokenizer, tmp_path, capsys):
    from megatron_slm.data import preprocess_corpus
    from megatron_slm.training.config import parse_config, validate
    from megatron_slm.training.data import build_datasets

    corpus = tmp_path / "code.jsonl"
    corpus.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in CODE * 10))
    model = tokenizer.unique_identifiers["path"]
    prefix = preprocess_corpus(
        [str(corpus)], str(tmp_path / "code"), "HuggingFaceTokenizer", model, append_eod=True
    )["text"]
    base = ["--data-path", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", model, "--seq-length", "64", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "4", "--split", "80,20,0",
            "--eval-interval", "2", "--eval-iters", "1", "--device", "cpu"]  # fmt: skip
    cfg = parse_config([*base, "--fim-data", "--fim-rate", "1", "--fim-pad-token", "<fim_pad>"])
    sizes = validate(cfg, 1, cfg.model.architecture(tokenizer.vocab_size))
    train, valid, _ = build_datasets(cfg, sizes, tokenizer, require_sidecar=False)
    fim_prefix, pad = (
        tokenizer.tokenize_with_specials(t)[0] for t in ("<fim_prefix>", "<fim_pad>")
    )
    for dataset in (train, valid):
        rows = [dataset[i] for i in range(len(dataset))]
        assert all((r["tokens"] == fim_prefix).any() for r in rows)
        for r in rows:  # (the FIM pad's labels, and only they, train nothing)
            assert torch.equal(r["loss_mask"] == 0, r["labels"] == pad)
    for extra, message in [
        (["--fim-split-sample", "<file_sep>"], "--fim-split-sample needs --fim-data"),
        (["--fim-data", "--fim-rate", "1.5"], "--fim-rate must be in \\[0, 1\\]"),
        (["--fim-data", "--fim-split-sample", "<file_sep>"], "go together"),
        (["--fim-data", "--slm-ratio", "0.6"], "select with --slm-ref-source online"),
    ]:
        with pytest.raises((ConfigError, SystemExit)) as err:  # (flags: exit 2 with the line)
            cfg = parse_config([*base, *extra])
            validate(cfg, 1, cfg.model.architecture(tokenizer.vocab_size))
        text = capsys.readouterr().err if isinstance(err.value, SystemExit) else str(err.value)
        assert re.search(message, text), text
    cfg = parse_config([*base, "--fim-data", "--fim-middle-token", "<mid>"])
    with pytest.raises(ConfigError, match="--fim-middle-token '<mid>' is not one token"):
        cfg.data.fim_settings(tokenizer)
