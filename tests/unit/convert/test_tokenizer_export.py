"""SentencePiece -> Hugging Face fast tokenizer export: ids equal ours (and sentencepiece's) on
varied text, decoding round-trips, the chat template renders in transformers exactly as our
jinja rendering does; HF tokenizers gain a template when they have none."""

import json
import os

import pytest

from megatron_slm.convert.tokenizer_export import (
    set_chat_template,
    write_generation_config,
    write_sentencepiece_hf_tokenizer,
)
from megatron_slm.data import build_tokenizer, train_sentencepiece
from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

pytest.importorskip("transformers")

TRAIN = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "numbers 12345 67890 3.14159 and 2026-11-22\n\nnew  lines   and\ttabs",
    "Données naïves, café crème — déjà vu. 日本語のテキスト 🙂",
    "def f(x):\n    return x * 2\n",
] * 10
SAMPLES = [
    "",
    " ",
    "  leading spaces",
    "trailing  ",
    "a\n\nb\n",
    "x    y\t\tz\r\n",
    "123 4567 89012345 0.5e-3",
    "héllo 日本語 🙂 Ω≈ç√",
    "never seen: ʤ ʥ ⁂ 𝔘𝔫𝔦 字",
    "The quick brown fox\n    return x",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi\nplease"},
    {"role": "assistant", "content": "hi  there"},
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def exported(request, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp(f"tok_{request.param}")
    model = train_sentencepiece(TRAIN, str(root / "sp"), 400, model_type=request.param)
    out = root / "hf"
    out.mkdir()
    write_sentencepiece_hf_tokenizer(model, str(out), DEFAULT_CHAT_TEMPLATE)
    ours = build_tokenizer("SentencePieceTokenizer", model)
    return ours, AutoTokenizer.from_pretrained(str(out)), str(out), model


def test_ids_equal_ours_and_decode_round_trips(exported):
    import sentencepiece as spm

    ours, hf, _, model = exported
    sp = spm.SentencePieceProcessor(model_file=model)
    for text in SAMPLES:
        ids = hf(text, add_special_tokens=False).input_ids
        assert ids == ours.tokenize(text) == sp.encode(text), repr(text)
        assert hf(text).input_ids == ids  # no BOS added: the data had none
        assert hf.decode(ids) == text == ours.detokenize(ids)
    # Special-token strings become their ids on both sides (rendered chat prompts).
    text = "<s>hi</s> there <unk>"
    assert hf(text, add_special_tokens=False).input_ids == ours.tokenize_with_specials(text)
    assert ours.tokenize_with_specials(text)[0] == sp.bos_id()


def test_special_tokens_and_chat_template(exported):
    ours, hf, path, _ = exported
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")
    assert hf.eos_token_id == ours.eod and hf.pad_token is None
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == DEFAULT_CHAT_TEMPLATE
    with open(os.path.join(path, "special_tokens_map.json")) as f:
        assert json.load(f)["eos_token"] == "</s>"
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered == ours.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered.startswith("<s><|system|>\n") and rendered.endswith("hi  there</s>")
    prompt = hf.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    # What inference feeds the model is what SFT trains on.
    assert hf(prompt, add_special_tokens=False).input_ids == ours.apply_chat_template(
        MESSAGES[:2], add_generation_prompt=True
    )


def test_hf_tokenizer_gains_template_when_absent(tmp_path):
    from tests.functional.hf_worker import make_tokenizer

    path = make_tokenizer(str(tmp_path / "tok"))
    assert set_chat_template(path, DEFAULT_CHAT_TEMPLATE, overwrite=False)
    assert not set_chat_template(path, "{{ 'other' }}", overwrite=False)  # kept
    ours = build_tokenizer("HuggingFaceTokenizer", path)
    assert ours.chat_template == DEFAULT_CHAT_TEMPLATE
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    assert hf.apply_chat_template(MESSAGES, tokenize=False) == ours.apply_chat_template(
        MESSAGES, tokenize=False
    )
    assert set_chat_template(path, "{{ 'other' }}", overwrite=True)
    assert AutoTokenizer.from_pretrained(path).chat_template == "{{ 'other' }}"


def test_generation_config(tmp_path):
    write_generation_config(str(tmp_path), 1, 2, -1)
    from transformers import GenerationConfig

    cfg = GenerationConfig.from_pretrained(str(tmp_path))
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)


def test_a_llama2_tokenizer_exports_with_its_bos(tmp_path):
    """A checkpoint trained on Llama2Tokenizer ids (BOS before each text) exports a tokenizer
    whose ``tokenizer(text)`` gives those ids; ``add_special_tokens=False`` the plain ones."""
    from transformers import AutoTokenizer

    from megatron_slm.checkpoint import CheckpointInfo, tokenizer_record
    from megatron_slm.convert.hf_files import export_tokenizer

    model = train_sentencepiece(TRAIN, str(tmp_path / "sp"), 400)
    ours = build_tokenizer("Llama2Tokenizer", model)
    meta = {"tokenizer": tokenizer_record("Llama2Tokenizer", model, ours)}
    (tmp_path / "hf").mkdir()
    ids = export_tokenizer(CheckpointInfo(str(tmp_path / "ckpt"), meta), str(tmp_path / "hf"))
    assert ids["bos_token_id"] == ours.bos == 1 and ids["eos_token_id"] == ours.eod
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in SAMPLES:
        assert hf(text).input_ids == ours.tokenize(text), repr(text)
        assert hf(text, add_special_tokens=False).input_ids == ours.tokenize_plain(text)
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text
