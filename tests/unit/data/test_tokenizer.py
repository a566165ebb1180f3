"""Tokenizers: sentencepiece training on a few KB, unicode round trip, NullTokenizer, factory."""

import pickle

import pytest

from megatron_slm.data import build_tokenizer, train_sentencepiece
from tests.remote_code import REFUSED, letters_ids, write_letters_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Données naïves, café crème et œufs — déjà vu.",
    "日本語のテキストと中文文本。",
    "Emoji: 😀🚀🎉 and math ∑∫√ symbols.",
] * 10


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(TEXTS, str(tmp_path_factory.mktemp("sp") / "tok"), vocab_size=400)


def test_sentencepiece_ids_match_plain_sentencepiece(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    text = "Ünïcödé 𝔘𝔫𝔦 ✓ never-seen 字 " + TEXTS[0]
    assert tok.tokenize(text) == sp.encode(text)
    assert tok.tokenize_batch([text, "", "a"]) == [sp.encode(text), [], sp.encode("a")]
    assert tok.detokenize(tok.tokenize(text)) == text  # byte_fallback: any unicode round-trips
    assert tok.eod == sp.eos_id() == 2
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.pad == -1
    assert "sha256=" in tok.identity()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(text) == tok.tokenize(text)
    # Megatron-LM's GPTSentencePieceTokenizer: the same ids, recorded under our name
    from megatron_slm.data.preprocess import PreprocessConfig
    from megatron_slm.data.tokenizer import TokenizerArgs

    alias = build_tokenizer("GPTSentencePieceTokenizer", sp_model)
    assert alias.tokenize(text) == tok.tokenize(text) and alias.eod == tok.eod
    named = TokenizerArgs(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert named.tokenizer_type == "SentencePieceTokenizer"
    prep = PreprocessConfig(
        input=["x.jsonl"], output_prefix="o", tokenizer_type="GPTSentencePieceTokenizer",
        tokenizer_model=sp_model,
    )  # fmt: skip
    assert prep.tokenizer_type == "SentencePieceTokenizer"


def test_llama2_tokenizer_leads_each_text_with_bos(sp_model, tmp_path):
    """Megatron-LM's Llama2Tokenizer: sentencepiece's ids after the BOS id (chat rendering and
    continuations add none); a model without a bos piece is refused."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_tokenizer("Llama2Tokenizer", sp_model)
    text = "Ünïcödé ✓ " + TEXTS[0]
    assert tok.bos == sp.bos_id() == 1 and tok.eod == sp.eos_id()
    assert tok.tokenize(text) == [1, *sp.encode(text)] and tok.tokenize("") == [1]
    assert tok.tokenize_batch([text, ""]) == [[1, *sp.encode(text)], [1]]
    assert tok.tokenize_plain(text) == sp.encode(text)
    assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.tokenize_with_specials("<s>hi</s>") == [1, *sp.encode("hi"), 2]
    assert tok.vocab_size == sp.get_piece_size()
    assert dict(tok.unique_identifiers)["class"] == "Llama2Tokenizer"
    assert pickle.loads(pickle.dumps(tok)).tokenize(text) == tok.tokenize(text)
    no_bos = train_sentencepiece(TEXTS, str(tmp_path / "nobos"), vocab_size=400, bos_id=-1)
    with pytest.raises(ValueError, match="no bos piece"):
        build_tokenizer("Llama2Tokenizer", no_bos)


def test_null_tokenizer():
    """Megatron-LM's NullTokenizer (megatron-core's copy of it): ``--vocab-size 100`` gives ids
    0 .. 99 and then its EOD, 100."""
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    ref = NullTokenizer(100)
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert tok.tokenize("3 1  4") == ref.text_to_ids("3 1 4") == [3, 1, 4]
    assert tok.detokenize([3, 1, 4]) == ref.ids_to_text([3, 1, 4]) == "3 1 4"
    assert (tok.eod, tok.vocab_size) == (ref.eod, ref.vocab_size) == (100, 101)
    assert tok.tokenize("100") == [100]  # the EOD, as text
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("101")
    assert dict(tok.unique_identifiers)["class"] == "NullTokenizer"
    assert dict(tok.unique_identifiers)["vocab_size"] == 101  # the ids in all, as recorded
    assert build_tokenizer("NullTokenizer", vocab_size=1).vocab_size == 2  # one id and the EOD


def test_factory_errors(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("BertWordPieceCase")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


def test_huggingface_tokenizer_from_local_dir(tmp_path, sp_model):
    pytest.importorskip("transformers")
    from transformers import LlamaTokenizer

    LlamaTokenizer(vocab_file=sp_model).save_pretrained(str(tmp_path / "hf"))
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    ids = tok.tokenize("hello world")
    assert tok.tokenize_batch(["hello world"]) == [ids]
    assert tok.eod == 2


def test_a_tokenizer_of_remote_code_runs_only_with_trust_remote_code(tmp_path):
    """--trust-remote-code (Megatron-LM's flag): without it such a tokenizer is one line and its
    code never runs; with it preprocessing (two workers: the tokenizer is pickled) writes the
    ids its code gives."""
    import json
    import os
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_slm.errors import TokenizerError
    from tests import zygote

    tok = tmp_path / "letters"
    write_letters_tokenizer(tok)
    with pytest.raises(TokenizerError) as refused:
        build_tokenizer("HuggingFaceTokenizer", str(tok))
    assert str(refused.value) == f"--tokenizer-model {tok}: {REFUSED}"
    texts = ["ab c", "hello world", "zz"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    env = dict(os.environ, PYTHONPATH=repo, HF_MODULES_CACHE=str(tmp_path / "modules"))

    def preprocess(*flags):
        cmd = [sys.executable, os.path.join(repo, "tools", "preprocess_data.py"), "--input",
               str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"), "--workers",
               "2", "--tokenizer-model", str(tok), *flags]  # fmt: skip
        return zygote.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    proc = preprocess("--tokenizer-type", "SentencePieceTokenizer", "--trust-remote-code")
    line = "--trust-remote-code is a HuggingFaceTokenizer's flag, not a SentencePieceTokenizer's"
    assert proc.returncode == 2 and line in proc.stderr
    proc = preprocess("--tokenizer-type", "HuggingFaceTokenizer", "--append-eod")
    assert proc.returncode == 2 and "give --trust-remote-code to run it" in proc.stderr
    assert not (tmp_path / "modules").exists()  # (its code was never imported)
    proc = preprocess("--tokenizer-type", "HuggingFaceTokenizer", "--append-eod",
                      "--trust-remote-code")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    expected = [letters_ids(t) + [1] for t in texts]  # then </s>, the EOD
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    # the trainer's and every --load tool's tokenizer rule (resolve_tokenizer) passes it too
    script = (
        "from megatron_slm.checkpoint import resolve_tokenizer\n"
        "from megatron_slm.data.tokenizer import TokenizerArgs\n"
        f"args = TokenizerArgs(tokenizer_type='HuggingFaceTokenizer', tokenizer_model={str(tok)!r},"
        " trust_remote_code=True)\n"
        "print(resolve_tokenizer(args, None)[0].tokenize('ab c'))\n"
    )
    proc = zygote.run([sys.executable, "-c", script], env=env, capture_output=True,
                      text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == str(expected[0][:-1]), proc.stderr
