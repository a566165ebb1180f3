"""Megatron-LM's TikTokenizer (megatron_slm/data/tiktoken_tokenizer.py): the ids of megatron-core's
own ``TikTokenTokenizer`` on the same JSON vocabulary (both patterns, a cut vocabulary, special
tokens in the text), a Hugging Face tokenizer exported from it giving the same ids, and a bad file
or flag in one line."""

from __future__ import annotations

import json
import pickle

import pytest

pytest.importorskip("tiktoken")

from megatron_slm.data.tiktoken_tokenizer import train_tiktoken  # noqa: E402
from megatron_slm.data.tokenizer import build_tokenizer  # noqa: E402
from megatron_slm.errors import ConfigError, UserError  # noqa: E402

CORPUS = [
    "The reference model scores every token; training keeps the tokens that matter most.",
    "Numbers 12345 and 3.14159, naïve café déjà vu, 東京 and 🙂 emoji.\n\nNew paragraph\tTab.",
    "HTTP/2 requests' headers: don't, can't, won't; CamelCaseWords and snake_case_words.",
] * 20
TEXTS = [
    *CORPUS[:3],
    "",
    "   leading spaces, trailing   ",
    "a special <s> in the text, and </s> too, <SPECIAL_9> and <pad>",
    "unseen: Ωμέγα Ψ ∑ \u200b zero width, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "lines\r\nwith CRLF\n\n\n and / slashes //",
]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.json"
    return str(train_tiktoken(CORPUS, str(path), 400))


def _megatron_core(path, **kwargs):
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer

    return TikTokenTokenizer(tokenizer_path=path, **kwargs)


@pytest.mark.parametrize("pattern", ["v1", "v2"])
def test_ids_are_megatron_cores(vocab, pattern):
    with open(vocab) as f:
        n_file = len(json.load(f))
    ours = build_tokenizer(
        "TikTokenizer", vocab, tiktoken={"pattern": pattern, "num_special_tokens": 16}
    )
    ref = _megatron_core(vocab, num_special_tokens=16, pattern=pattern, vocab_size=16 + n_file)
    assert ours.vocab_size == ref.vocab_size == 16 + n_file > 256 + 16
    assert ours.eod == ref.eos_id == 2 and ours.pad == 4
    for text in TEXTS:
        ids = ours.tokenize(text)
        assert ids == ref.text_to_ids(text), text
        # whole-text decoding (megatron-core 0.16 decodes token by token, which breaks a
        # character split across tokens; Megatron-LM's newer versions decode the whole text)
        assert ours.detokenize(ids) == text
    assert ours.tokenize_batch(TEXTS) == [ref.text_to_ids(t) for t in TEXTS]
    assert ours.tokenize("x<s>y") == [*ours.tokenize("x"), 1, *ours.tokenize("y")]  # Megatron-LM
    # --vocab-size cuts the file: the first ranks only, as megatron-core cuts it
    cut = build_tokenizer("TikTokenizer", vocab, 16 + 300, tiktoken={"num_special_tokens": 16})
    ref_cut = _megatron_core(vocab, num_special_tokens=16, vocab_size=16 + 300)
    assert cut.vocab_size == 316
    for text in TEXTS:
        assert cut.tokenize(text) == ref_cut.text_to_ids(text)
        assert max(cut.tokenize(text), default=0) < 316
    # Megatron-LM's defaults: 1000 special ids, the file whole; preprocessing workers unpickle it
    default = build_tokenizer("TikTokenizer", vocab)
    assert default.vocab_size == 1000 + n_file
    assert pickle.loads(pickle.dumps(default)).tokenize(TEXTS[1]) == default.tokenize(TEXTS[1])
    assert default.unique_identifiers["sha256"] and default.options() == {
        "pattern": "v2",
        "num_special_tokens": 1000,
        "special_tokens": ["<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>"],
    }


def test_exported_hugging_face_tokenizer_gives_the_same_ids(vocab, tmp_path):
    """The export's tokenizer.json (its merges rebuilt from the ranks) encodes like tiktoken."""
    from transformers import AutoTokenizer

    from megatron_slm.convert.tokenizer_export import write_tiktoken_hf_tokenizer

    for pattern in ("v1", "v2"):
        ours = build_tokenizer(
            "TikTokenizer", vocab, tiktoken={"pattern": pattern, "num_special_tokens": 12}
        )
        out = tmp_path / pattern
        out.mkdir()
        write_tiktoken_hf_tokenizer(ours, str(out), "{{ messages }}")
        hf = AutoTokenizer.from_pretrained(str(out))
        assert len(hf) == ours.vocab_size and hf.eos_token_id == ours.eod
        for text in TEXTS:
            assert hf(text).input_ids == ours.tokenize(text), (pattern, text)
            assert hf.decode(ours.tokenize(text)) == text


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", "tiktoken vocabulary file not found"),
        ("not json", "not a tiktoken JSON vocabulary"),
        ("bad rank", "entry 300 is not {'rank': 300"),
        ("bad byte", "entry 65 must be the single byte 65"),
    ],
)
def test_bad_vocabulary_file_is_one_line(vocab, tmp_path, change, message):
    path = tmp_path / "bad.json"
    entries = json.loads(open(vocab).read())
    if change == "not json":
        path.write_text("{")
    elif change == "bad rank":
        entries[300]["rank"] = 7
        path.write_text(json.dumps(entries))
    elif change == "bad byte":
        entries[65]["token_bytes"] = entries[66]["token_bytes"]
        path.write_text(json.dumps(entries))
    with pytest.raises((UserError, FileNotFoundError), match=message):
        build_tokenizer("TikTokenizer", str(path))


@pytest.mark.parametrize(
    "vocab_size, tiktoken, message",
    [
        (None, {"special_tokens": ["<s>", "</s>"]}, "must include <unk>, <mask>, <pad>"),
        (None, {"num_special_tokens": 3}, "--tiktoken-num-special-tokens 3 is fewer than the 7"),
        (None, {"pattern": "v3"}, "--tiktoken-pattern must be v1 or v2"),
        (10**6, {}, "--vocab-size 1000000: "),
        (1100, {}, "leaves fewer than the 256 byte tokens"),
    ],
)
def test_bad_options_are_one_line(vocab, vocab_size, tiktoken, message):
    with pytest.raises(ConfigError, match=message):
        build_tokenizer("TikTokenizer", vocab, vocab_size, tiktoken=tiktoken)


def test_tiktoken_flags_belong_to_the_tiktokenizer():
    from megatron_slm.data.tokenizer import TokenizerArgs

    with pytest.raises(ConfigError, match="--tiktoken-pattern is a TikTokenizer's flag"):
        TokenizerArgs(tokenizer_type="GPT2BPETokenizer", tiktoken_pattern="v1")
