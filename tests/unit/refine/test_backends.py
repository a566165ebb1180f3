"""A SentencePiece .model as the refining tokenizer (annotation before the model exists)."""

import pytest

from megatron_slm.refine.backends import BackendError, load_tokenizer

TEXTS = [
    "[doc]\n[000]Home | About | Contact\n[001]Question: Ada has 3 apples. Answer: 3.\n[/doc]",
    "remove_lines(line_start=0, line_end=0)\nkeep_chunk()\nkeep_doc()\ndrop_doc()",
] * 20


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from megatron_slm.data.tokenizer import train_sentencepiece

    return train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("tok") / "tok"), 400)


def test_sentencepiece_model_reads_as_its_export(spm_model, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    from megatron_slm.convert.tokenizer_export import write_sentencepiece_hf_tokenizer
    from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

    tok = load_tokenizer(spm_model, "--tokenizer", sentencepiece_ok=True)
    write_sentencepiece_hf_tokenizer(spm_model, str(tmp_path), DEFAULT_CHAT_TEMPLATE)
    exported = AutoTokenizer.from_pretrained(str(tmp_path))
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    for text in TEXTS[:2] + ["Ünïcode  and\ttabs 12345"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text) == exported(text, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": TEXTS[0]}]
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.apply_chat_template(messages, tokenize=False) == exported.apply_chat_template(
        messages, tokenize=False
    )


def test_a_file_is_refused_unless_allowed_and_a_bad_one_is_named(spm_model, tmp_path):
    with pytest.raises(BackendError, match="--doc-model .*not a directory"):
        load_tokenizer(spm_model, "--doc-model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(BackendError, match=f"--tokenizer {bad}: not a SentencePiece model"):
        load_tokenizer(str(bad), "--tokenizer", sentencepiece_ok=True)


def test_a_model_the_export_refuses_is_refused_with_its_reason(spm_model, tmp_path):
    from megatron_slm.tinylm import spm
    from megatron_slm.tinylm.prune import pruned_proto, write_model

    proto = spm.load_model_proto(spm_model)
    keep = [i for i, p in enumerate(proto.pieces) if p.piece != "o"]
    path = str(tmp_path / "no_o.model")
    write_model(pruned_proto(proto, keep), path)
    with pytest.raises(BackendError, match=f"^--tokenizer {path}: BPE pieces are built from"):
        load_tokenizer(path, "--tokenizer", sentencepiece_ok=True)
