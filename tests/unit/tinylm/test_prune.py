"""Pruning SentencePiece models: exact size, same strings, mandatory pieces, reachability (checked
with SentencePiece itself), round trip of arbitrary Unicode (hypothesis), and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm_lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_slm.tinylm import spm
from megatron_slm.tinylm.prune import prune_model, select_pieces, write_model
from megatron_slm.tinylm.spm import TokenizerModelError


def _pruned(models, kind, n, tmp_path):
    proto = spm.load_model_proto(models[kind]["model"])
    result = prune_model(proto, models[kind]["counts"], n)
    path = str(tmp_path / f"{kind}_{n}.model")
    write_model(result.proto, path)
    return proto, result, spm_lib.SentencePieceProcessor(model_file=path)


@pytest.mark.parametrize("kind,n", [("bpe", 600), ("bpe", 300), ("unigram", 350)])
def test_pruned_model_pieces(models, kind, n, tmp_path):
    proto, result, small = _pruned(models, kind, n, tmp_path)
    big = models[kind]["sp"]
    kept = result.selection.kept
    assert small.get_piece_size() == n == len(kept)
    assert kept == sorted(set(kept))
    for new, old in enumerate(kept):
        assert small.id_to_piece(new) == big.id_to_piece(old)
        assert small.get_score(new) == big.get_score(old)
    # Control, unknown, user-defined and the 256 byte pieces are all kept.
    special = [
        i
        for i in range(big.get_piece_size())
        if big.is_control(i) or big.is_unknown(i) or big.is_byte(i)
        or proto.pieces[i].type == spm.USER_DEFINED
    ]  # fmt: skip
    assert set(special) <= set(kept)
    assert sum(big.is_byte(i) for i in kept) == 256
    assert small.eos_id() == kept.index(big.eos_id()) and small.unk_id() == kept.index(big.unk_id())
    # Model type and normalizer are the original's; the trainer spec says N.
    assert result.proto.trainer_spec.model_type == proto.trainer_spec.model_type
    assert result.proto.normalizer_spec == proto.normalizer_spec
    assert result.proto.trainer_spec.vocab_size == n
    # Every kept piece is producible: its own string (normalization off) encodes to it.
    raw = spm.raw_processor(result.proto)
    for new, old in enumerate(kept):
        if proto.pieces[old].type in (spm.NORMAL, spm.USER_DEFINED):
            assert raw.encode(proto.pieces[old].piece) == [new], proto.pieces[old].piece
    assert result.unreachable_kept == []


def test_frequency_order_and_coverage(models):
    """Kept normal pieces are the most frequent ones (plus their merge closure)."""
    proto = spm.load_model_proto(models["bpe"]["model"])
    counts = models["bpe"]["counts"]
    sel = select_pieces(proto, counts, 600)
    kept, closure = set(sel.kept), set(sel.by_closure)
    normal = [i for i, p in enumerate(proto.pieces) if p.type == spm.NORMAL]
    own = [i for i in normal if i in kept and i not in closure and i not in sel.mandatory]
    dropped = [i for i in normal if i not in kept]
    # Every piece kept on its own frequency is at least as frequent as every dropped piece whose
    # closure would have fit (only the last pieces of the budget may have skipped a larger one).
    assert min(counts[own]) >= np.percentile(counts[dropped], 99)
    assert counts[sel.kept].sum() / counts.sum() > 0.9


def test_bpe_closure_needed_and_kept(models):
    """Counts that favour only long pieces: their intermediate pieces must come along."""
    proto = spm.load_model_proto(models["bpe"]["model"])
    n_mandatory = sum(p.type in spm.MANDATORY_TYPES for p in proto.pieces)
    lengths = np.array([len(p.piece) if p.type == spm.NORMAL else 0 for p in proto.pieces])
    counts = np.where(lengths >= 5, 1000 + lengths, 0).astype(np.int64)
    sel = select_pieces(proto, counts, n_mandatory + 60)
    assert len(sel.kept) == n_mandatory + 60
    assert sel.by_closure, "long pieces need their intermediate merges"
    assert all(lengths[i] < 5 or counts[i] > 0 for i in sel.by_closure)
    pruned = prune_model(proto, counts, n_mandatory + 60)
    assert pruned.unreachable_kept == []


def test_bpe_trace_matches_sentencepiece(models):
    """The Python merge replay agrees with SentencePiece on every piece of the original model."""
    proto = spm.load_model_proto(models["bpe"]["model"])
    scores = {p.piece: p.score for p in proto.pieces if p.type == spm.NORMAL}
    raw = spm.raw_processor(proto)
    for i, p in enumerate(proto.pieces):
        if p.type != spm.NORMAL:
            continue
        trace = spm.bpe_trace(p.piece, scores)
        produced = bool(trace) and trace[-1] == p.piece or len(p.piece) == 1
        assert produced == (raw.encode(p.piece) == [i]), p.piece


def test_dropping_an_intermediate_breaks_reachability(models):
    """Why the closure exists: without an intermediate merge the long piece is not produced."""
    proto = spm.load_model_proto(models["bpe"]["model"])
    scores = {p.piece: p.score for p in proto.pieces if p.type == spm.NORMAL}
    long_piece = next(
        (i, t) for i, p in enumerate(proto.pieces)
        if p.type == spm.NORMAL and len(t := spm.bpe_trace(p.piece, scores)) >= 3
    )  # fmt: skip
    i, trace = long_piece
    from megatron_slm.tinylm.prune import pruned_proto

    index = {p.piece: j for j, p in enumerate(proto.pieces)}
    keep = [j for j in range(len(proto.pieces)) if j != index[trace[0]]]
    broken = pruned_proto(proto, keep)
    assert keep.index(i) in spm.unreachable_pieces(broken)


CHARS = st.one_of(
    st.characters(codec="utf-8"),  # any scalar value: control characters, CJK, emoji, ...
    st.sampled_from(list("日本語の中文字😀🎉👍🏽 \t\n\x00\x07\x1b\u0301\u2581")),
    st.sampled_from(list("the and of to in is was that ")),
)


@pytest.fixture(scope="module")
def pruned_pair(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    out = {}
    for kind, n in (("bpe", 400), ("unigram", 350)):
        _, result, small = _pruned(models, kind, n, root)
        out[kind] = (models[kind]["sp"], small)
    return out


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.lists(CHARS, max_size=60).map("".join))
def test_round_trip_arbitrary_unicode(pruned_pair, text):
    """decode(encode(x)) is the model's normalization of x: byte fallback covers every character
    the pruned model has no piece for."""
    for kind, (big, small) in pruned_pair.items():
        ids = small.encode(text)
        assert all(0 <= i < small.get_piece_size() for i in ids)
        assert small.decode(ids) == big.decode(big.encode(text)), kind
    _, small_bpe = pruned_pair["bpe"]
    # Identity normalization: exactly x, except that a literal "▁" is SentencePiece's escaped
    # space in any model (the original decodes it to " " as well).
    assert small_bpe.decode(small_bpe.encode(text)) == text.replace("\u2581", " ")


def test_too_small_vocab_size(models):
    proto = spm.load_model_proto(models["bpe"]["model"])
    with pytest.raises(TokenizerModelError, match=r"--vocab-size 100 is smaller than the 260"):
        select_pieces(proto, models["bpe"]["counts"], 100)
    with pytest.raises(TokenizerModelError, match="larger than the model's 1000"):
        select_pieces(proto, models["bpe"]["counts"], 1001)


def test_unprunable_models(models, tmp_path):
    proto = spm.load_model_proto(models["bpe"]["model"])
    proto.trainer_spec.model_type = 3  # word
    with pytest.raises(TokenizerModelError, match="word model cannot be pruned"):
        spm.check_prunable(proto, "x.model")
    with pytest.raises(TokenizerModelError, match="Hugging Face tokenizer directory"):
        spm.load_model_proto(str(tmp_path))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\xff\x00not a proto")
    with pytest.raises(TokenizerModelError, match="not a SentencePiece model"):
        spm.load_model_proto(str(bad))


@pytest.fixture(scope="module")
def pruned_bpe_export(models, tmp_path_factory):
    """The tight BPE pruning exported as a Hugging Face tokenizer, as the trainer's export does."""
    from transformers import AutoTokenizer

    from megatron_slm.convert.tokenizer_export import write_sentencepiece_hf_tokenizer
    from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

    root = tmp_path_factory.mktemp("export")
    _, result, small = _pruned(models, "bpe", 300, root)
    write_sentencepiece_hf_tokenizer(str(root / "bpe_300.model"), str(root), DEFAULT_CHAT_TEMPLATE)
    return small, AutoTokenizer.from_pretrained(str(root)), result


def test_pruned_bpe_keeps_the_characters_of_its_pieces(pruned_bpe_export):
    small, _, result = pruned_bpe_export
    pieces = {p.piece for p in result.proto.pieces}
    for p in result.proto.pieces:
        if p.type == spm.NORMAL:
            assert set(p.piece) <= pieces, p.piece


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.lists(CHARS, max_size=60).map("".join))
def test_pruned_bpe_exports_to_the_same_ids(pruned_bpe_export, text):
    """A model trained with the pruned tokenizer sees the same ids through its HF export."""
    small, hf, _ = pruned_bpe_export
    assert hf(text, add_special_tokens=False).input_ids == small.encode(text)


def test_export_refuses_a_bpe_model_missing_characters(models, tmp_path):
    """What pruning did before it kept characters: the export would silently differ."""
    from megatron_slm.convert.tokenizer_export import sentencepiece_to_fast
    from megatron_slm.errors import TokenizerError
    from megatron_slm.tinylm.prune import pruned_proto

    proto = spm.load_model_proto(models["bpe"]["model"])
    index = {p.piece: j for j, p in enumerate(proto.pieces)}
    keep = [j for j in range(len(proto.pieces)) if j != index["o"]]
    path = str(tmp_path / "no_o.model")
    write_model(pruned_proto(proto, keep), path)
    with pytest.raises(TokenizerError, match=f"{path}: BPE pieces are built from 1 char.*'o'"):
        sentencepiece_to_fast(path)
