"""Megatron-LM's GPT2BPETokenizer (``--vocab-file`` + ``--merge-file``): ids equal an independent
implementation of OpenAI's byte-level BPE (``encoder.py``, the algorithm Megatron-LM's
``gpt2_tokenization`` copies) on varied text; the files are checked; preprocessing, the
checkpoint record and the Hugging Face export carry both files."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from megatron_slm.data import preprocess_corpus
from megatron_slm.data.tokenizer import (
    GPT2_EOD,
    TokenizerArgs,
    build_tokenizer,
    train_gpt2_bpe,
)
from megatron_slm.errors import CheckpointError, ConfigError, TokenizerError
from tests.unit.convert.test_tokenizer_export import SAMPLES as EXPORT_SAMPLES

regex = pytest.importorskip("regex")
pytest.importorskip("tokenizers")

TRAIN = [
    "The quick brown fox's jumps over the lazy dog. I'll say it's 2026, we've 12345 reasons. " * 2,
    "Données naïves, café crème — déjà vu. 日本語のテキスト 🙂\n\n  spaces   and\ttabs\r\n",
    "def f(x):\n    return x * 2  # comment\n",
] * 8
# The export test's varied text, and what GPT-2's regex splits in its own ways.
SAMPLES = [
    *EXPORT_SAMPLES,
    "it's I'll we've they'd you're I'm don't IT'S",
    "text <|endoftext|> more",  # plain text to Megatron-LM's tokenize
]


# -- the reference: OpenAI's byte-level BPE, written out ------------------------------------------
_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def _byte_symbols() -> dict[int, str]:
    """Each byte's printable stand-in: printable Latin-1 bytes stand for themselves, the others
    take the code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceBPE:
    def __init__(self, vocab_file: str, merge_file: str) -> None:
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(merge_file, encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n")[1:] if ln]
        self.ranks = {tuple(ln.split()): i for i, ln in enumerate(lines)}
        self.symbols = _byte_symbols()

    def _bpe(self, word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _PATTERN.findall(text):
            word = "".join(self.symbols[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self._bpe(word)]
        return ids


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    return train_gpt2_bpe(TRAIN, str(root / "gpt2"), 420)


def test_ids_equal_openai_bpe_and_decode_round_trips(bpe_files):
    vocab_file, merge_file = bpe_files
    assert os.path.basename(vocab_file) == "gpt2-vocab.json"
    ours, ref = (
        build_tokenizer("GPT2BPETokenizer", vocab_file, None, merge_file),
        ReferenceBPE(*bpe_files),
    )
    with open(vocab_file) as f:
        vocab = json.load(f)
    assert ours.vocab_size == len(vocab) > 256 and ours.eod == vocab[GPT2_EOD]
    assert ours.bos is None  # adds nothing around a text
    merged = 0
    for text in SAMPLES:
        ids = ours.tokenize(text)
        assert ids == ref.encode(text), repr(text)
        assert ours.detokenize(ids) == text
        merged += len(text.encode()) - len(ids)
    assert merged > 50  # the merges were applied, not only bytes
    assert ours.tokenize_batch(SAMPLES) == [ours.tokenize(t) for t in SAMPLES]
    # "<|endoftext|>" is plain text to tokenize, the EOD id to the chat path
    assert ours.eod not in ours.tokenize("a <|endoftext|> b")
    assert ours.tokenize_with_specials("a<|endoftext|> b") == [
        *ours.tokenize("a"),
        ours.eod,
        *ours.tokenize(" b"),
    ]
    again = pickle.loads(pickle.dumps(ours))  # preprocessing workers get it this way
    assert again.tokenize(SAMPLES[8]) == ours.tokenize(SAMPLES[8])
    assert ours.unique_identifiers["merge_file"] == os.path.abspath(merge_file)


def _write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_merges_apply_by_rank(tmp_path):
    """Where two merges compete ("abc": "a b" or "b c" first), the earlier line wins."""
    symbols = list(_byte_symbols().values())
    vocab = {t: i for i, t in enumerate([*symbols, GPT2_EOD, "ab", "bc"])}
    vocab_file = _write(tmp_path / "vocab.json", json.dumps(vocab))
    for merges, expected in ((["a b", "b c"], ["ab", "c"]), (["b c", "a b"], ["a", "bc"])):
        merge_file = _write(tmp_path / "merges.txt", "\n".join(["#version: 0.2", *merges, ""]))
        ours = build_tokenizer("GPT2BPETokenizer", vocab_file, None, merge_file)
        assert ours.tokenize("abc") == ReferenceBPE(vocab_file, merge_file).encode("abc")
        assert ours.tokenize("abc") == [vocab[t] for t in expected]


def test_bad_files_are_refused_naming_the_file(bpe_files, tmp_path):
    vocab_file, merge_file = bpe_files
    with open(vocab_file) as f:
        vocab = json.load(f)
    with open(merge_file) as f:
        merges = f.read()
    no_eod = {k: v for k, v in vocab.items() if k != GPT2_EOD}
    no_eod = {k: i for i, k in enumerate(sorted(no_eod, key=no_eod.get))}
    missing_byte = dict(vocab)
    missing_byte["zzz"] = missing_byte.pop("Ā")  # a byte symbol
    cases = [
        (_write(tmp_path / "v.json", "{not json"), merge_file, "not a JSON vocabulary"),
        (_write(tmp_path / "l.json", "[1, 2]"), merge_file, "expected {token: id}"),
        (_write(tmp_path / "e.json", json.dumps(no_eod)), merge_file, "no <|endoftext|>"),
        (_write(tmp_path / "b.json", json.dumps(missing_byte)), merge_file, "256 byte symbols"),
        (
            _write(tmp_path / "g.json", json.dumps({**vocab, "gap": len(vocab) + 5})),
            merge_file,
            "ids are not 0..",
        ),
        (vocab_file, _write(tmp_path / "h.txt", merges.split("\n", 1)[1]), "'#version: ...'"),
        (vocab_file, _write(tmp_path / "u.txt", merges + "Ġqq zz\n"), "is not a merge"),
    ]
    for vf, mf, needle in cases:
        with pytest.raises(TokenizerError) as err:
            build_tokenizer("GPT2BPETokenizer", vf, None, mf)
        assert needle in str(err.value), str(err.value)
        assert (vf if mf in bpe_files else mf) in str(err.value), str(err.value)
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file, None, str(tmp_path / "absent.txt"))


def test_flags_name_the_type_they_belong_to(bpe_files):
    vocab_file, merge_file = bpe_files
    refusals = [
        (dict(tokenizer_type="SentencePieceTokenizer", vocab_file=vocab_file), "--vocab-file"),
        (dict(tokenizer_type="NullTokenizer", merge_file=merge_file), "reads --vocab-size"),
        (dict(tokenizer_type="GPT2BPETokenizer", tokenizer_model="x.model"), "not --tokenizer-"),
        (dict(vocab_file=vocab_file, tokenizer_model="x.model"), "two tokenizers"),
    ]
    for kwargs, needle in refusals:
        with pytest.raises(ConfigError, match=needle):
            TokenizerArgs(**kwargs)


def test_checkpoint_record_resolves_and_guards_both_files(bpe_files, tmp_path):
    """The record names both files and digests both: a later load with no tokenizer flags builds
    the same tokenizer; a merges file edited since is refused; flags fill in from the record."""
    import shutil

    from megatron_slm.checkpoint import CheckpointInfo, resolve_tokenizer, tokenizer_record

    vocab_file = shutil.copy(bpe_files[0], tmp_path / "vocab.json")
    merge_file = shutil.copy(bpe_files[1], tmp_path / "merges.txt")
    args = TokenizerArgs(vocab_file=str(vocab_file), merge_file=str(merge_file))
    tok, ttype, model = resolve_tokenizer(args, None)
    assert (ttype, model) == ("GPT2BPETokenizer", str(vocab_file))  # the files name the type
    record = tokenizer_record(ttype, model, tok)
    assert record["merge_file"] == os.path.abspath(merge_file) and len(record["sha256"]) == 16
    info = CheckpointInfo(str(tmp_path / "ckpt"), {"tokenizer": record})
    again, *_ = resolve_tokenizer(TokenizerArgs(), info)
    assert again.tokenize(SAMPLES[6]) == tok.tokenize(SAMPLES[6])
    given, *_ = resolve_tokenizer(TokenizerArgs(tokenizer_type="GPT2BPETokenizer"), info)
    assert given.unique_identifiers == tok.unique_identifiers
    with open(merge_file) as f:
        lines = f.read().split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # two merges swap ranks: other ids, same vocabulary
    _write(merge_file, "\n".join(lines))
    with pytest.raises(TokenizerError) as err:
        resolve_tokenizer(TokenizerArgs(), info)
    assert str(merge_file) in str(err.value) and record["sha256"] in str(err.value)
    assert "--vocab-file/--merge-file" in str(err.value)
    with pytest.raises(CheckpointError, match="--vocab-file and --merge-file"):
        resolve_tokenizer(TokenizerArgs(tokenizer_type="GPT2BPETokenizer"), None)


def test_preprocess_writes_its_ids(bpe_files, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tests.unit.data import write_jsonl

    texts = [t for t in SAMPLES if t.strip()] * 3
    write_jsonl(str(tmp_path / "in.jsonl"), [{"text": t} for t in texts])
    tok = build_tokenizer("GPT2BPETokenizer", bpe_files[0], None, bpe_files[1])
    outs = [
        preprocess_corpus(
            [str(tmp_path / "in.jsonl")],
            str(tmp_path / f"w{workers}"),
            "GPT2BPETokenizer",
            vocab_file=bpe_files[0],
            merge_file=bpe_files[1],
            append_eod=True,
            workers=workers,
            log_interval=0,
        )["text"]
        for workers in (1, 2)
    ]
    for prefix in outs:
        ds = IndexedDataset(prefix)
        assert len(ds) == len(texts)
        for i, text in enumerate(texts):
            np.testing.assert_array_equal(ds[i], [*tok.tokenize(text), tok.eod])


def test_export_is_gpt2s_kind_of_hf_tokenizer(bpe_files, tmp_path):
    """A checkpoint trained on GPT2BPETokenizer ids exports a tokenizer whose ids are those."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from megatron_slm.checkpoint import CheckpointInfo, tokenizer_record
    from megatron_slm.convert.hf_files import export_tokenizer

    ours = build_tokenizer("GPT2BPETokenizer", bpe_files[0], None, bpe_files[1])
    meta = {"tokenizer": tokenizer_record("GPT2BPETokenizer", bpe_files[0], ours)}
    out = tmp_path / "hf"
    out.mkdir()
    ids = export_tokenizer(CheckpointInfo(str(tmp_path / "ckpt"), meta), str(out))
    assert ids["eos_token_id"] == ids["bos_token_id"] == ours.eod
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= set(os.listdir(out))
    hf = AutoTokenizer.from_pretrained(str(out))
    for text in SAMPLES:
        assert hf(text).input_ids == ours.tokenize_with_specials(text), repr(text)
        assert hf.decode(ours.tokenize(text)) == text
    assert hf.eos_token == GPT2_EOD and hf.pad_token is None
    # A missing recorded file is named, with where else it may be.
    meta["tokenizer"]["merge_file"] = str(tmp_path / "gone.txt")
    from megatron_slm.runtime.hf_source import ConversionError

    with pytest.raises(ConversionError, match="merges.txt"):
        export_tokenizer(CheckpointInfo(str(tmp_path / "ckpt"), meta), str(tmp_path))
