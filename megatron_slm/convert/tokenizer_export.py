"""A Hugging Face fast tokenizer (+ chat template, generation config) for an exported checkpoint.

:func:`sentencepiece_to_fast` builds ``tokenizer.json`` from a SentencePiece model with the
``tokenizers`` library directly (what transformers' Llama converter builds, without depending on
its version-specific converter classes), so that
``AutoTokenizer.from_pretrained(dir)(text, add_special_tokens=False).input_ids`` equals our
``SentencePieceTokenizer.tokenize(text)`` (``tokenize_with_specials`` when the text contains
special-token strings):

* model: BPE (vocabulary = the pieces in id order, merges from the pieces, byte fallback) or
  Unigram (pieces with their scores);
* normalizer: the model's precompiled character map when it has one (e.g. ``nmt_nfkc``), its
  whitespace rule (``remove_extra_whitespaces``: strip, collapse runs of spaces), the dummy
  prefix ``▁`` (``add_dummy_prefix``), then spaces -> ``▁``; applied to each piece of text between
  special tokens, like SentencePiece on each piece;
* control and unknown pieces are special added tokens (``<s>``, ``</s>``, ``<unk>``, ...);
* decoder: ``▁`` -> space, byte fallback, fuse, strip the dummy prefix's space.

No BOS is added by ``tokenizer(text)`` (``add_bos_token`` false): our training data has no BOS
(Megatron-LM's SentencePiece tokenizer adds none), so HF ids equal the ids the model was trained
on. The chat template writes ``bos_token`` itself. A ``Llama2Tokenizer``'s export (``add_bos``)
leads each text with the BOS id, as its ids did in training (a post-processor, like Llama 2's own
``tokenizer.json``; ``add_special_tokens=False`` leaves it out).

A ``GPT2BPETokenizer`` (:func:`write_gpt2_hf_tokenizer`) exports as GPT-2's own Hugging Face
tokenizer does: the same byte-level BPE, ``<|endoftext|>`` its bos, eos and unk token, no BOS
added, and ``vocab.json``/``merges.txt`` beside ``tokenizer.json``.

A ``TikTokenizer`` (:func:`write_tiktoken_hf_tokenizer`) becomes a byte-level BPE whose merges are
rebuilt from the ranks (each token is the merge of the two parts the lowest-rank-first BPE of its
bytes ends with, at the priority of its rank: what tiktoken computes), whole pieces looked up
first (``ignore_merges``, as tiktoken does), Megatron-LM's regular expression as a split before
the byte mapping, and the special ids as special added tokens matched in any text (tiktoken's
``allowed_special="all"``).
"""

from __future__ import annotations

import json
import os

from megatron_slm.atomic_io import write_json_atomic, write_text_atomic
from megatron_slm.errors import TokenizerError


def _spm_proto(model_file: str):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _bpe_merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split ``(a, b)`` of a piece into two pieces, ordered by the merged piece's id (its
    rank: SentencePiece BPE pieces are sorted by score), then by the parts' ids, as transformers'
    ``SentencePieceExtractor``."""
    merges = []
    for merged in pieces:
        for i in range(1, len(merged)):
            a, b = merged[:i], merged[i:]
            if a in vocab and b in vocab:
                merges.append((vocab[merged], vocab[a], vocab[b], a, b))
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def _check_bpe_characters(model_file: str, proto) -> None:
    """SentencePiece's BPE merges characters whether or not they are pieces; Hugging Face's BPE
    starts from pieces (a character that is none falls back to bytes), so a piece built from a
    character the model lacks would never be produced and the ids would silently differ. Models
    pruned by ``tools/compact_tokenizer.py`` before it kept such characters are refused."""
    pieces = {p.piece for p in proto.pieces}
    missing = {
        c
        for p in proto.pieces
        if p.type == 1 and len(p.piece) > 1  # NORMAL
        for c in p.piece
        if c not in pieces
    }
    if missing:
        shown = "".join(sorted(missing))[:40]
        raise TokenizerError(
            f"{model_file}: BPE pieces are built from {len(missing)} characters that are not "
            f"pieces ({shown!r}); a Hugging Face tokenizer cannot reproduce its ids. Prune the "
            f"tokenizer again with tools/compact_tokenizer.py prune (it now keeps them)"
        )


def sentencepiece_to_fast(model_file: str):
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece model (see the module doc)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = _spm_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [p.piece for p in proto.pieces]
    byte_fallback = bool(trainer.byte_fallback)
    if trainer.model_type == 2:  # BPE
        _check_bpe_characters(model_file, proto)
        vocab = {p: i for i, p in enumerate(pieces)}
        model = models.BPE(
            vocab,
            _bpe_merges(pieces, vocab),
            unk_token=pieces[trainer.unk_id],
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    elif trainer.model_type == 1:  # Unigram
        model = models.Unigram(
            [(p.piece, p.score) for p in proto.pieces], trainer.unk_id, byte_fallback
        )
    else:
        raise TokenizerError(
            f"{model_file}: SentencePiece model type {trainer.model_type} is not supported "
            "(BPE or Unigram)"
        )
    tok = Tokenizer(model)
    seq = []
    if norm.precompiled_charsmap:
        seq.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        seq += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        seq.append(normalizers.Prepend("▁"))
    seq.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(seq)
    dec = [decoders.Replace("▁", " ")]
    if byte_fallback:
        dec += [decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # Control (3) and unknown (2) pieces are special; user-defined (4) ones are atomic.
    added = [
        AddedToken(p.piece, special=p.type in (2, 3), normalized=False)
        for p in proto.pieces
        if p.type in (2, 3, 4)
    ]
    tok.add_tokens(added)
    return tok


def _piece(proto, idx: int) -> str | None:
    return proto.pieces[idx].piece if 0 <= idx < len(proto.pieces) else None


def write_sentencepiece_hf_tokenizer(
    model_file: str,
    save: str,
    chat_template: str,
    model_max_length: int | None = None,
    add_bos: bool = False,
) -> list[str]:
    """tokenizer.json, tokenizer_config.json (with ``chat_template``) and special_tokens_map.json
    for a SentencePiece model; returns the file names. ``add_bos``: ``tokenizer(text)`` leads
    with the BOS id (a ``Llama2Tokenizer``'s ids)."""
    proto = _spm_proto(model_file)
    t = proto.trainer_spec
    special = {
        "bos_token": _piece(proto, t.bos_id),
        "eos_token": _piece(proto, t.eos_id),
        "unk_token": _piece(proto, t.unk_id),
        "pad_token": _piece(proto, t.pad_id),
    }
    tok = sentencepiece_to_fast(model_file)
    if add_bos:
        from tokenizers import processors

        bos = special["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, t.bos_id)]
        )
    write_text_atomic(os.path.join(save, "tokenizer.json"), tok.to_str())
    decoder = {
        str(i): {
            "content": p.piece,
            "special": p.type in (2, 3),
            "normalized": False,
            "lstrip": False,
            "rstrip": False,
            "single_word": False,
        }
        for i, p in enumerate(proto.pieces)
        if p.type in (2, 3, 4)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length or 1_000_000_000,
        "chat_template": chat_template,
    }
    write_json_atomic(os.path.join(save, "tokenizer_config.json"), config)
    write_json_atomic(
        os.path.join(save, "special_tokens_map.json"),
        {k: v for k, v in special.items() if v is not None},
    )
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def write_gpt2_hf_tokenizer(
    vocab_file: str, merge_file: str, save: str, chat_template: str
) -> list[str]:
    """tokenizer.json, tokenizer_config.json (with ``chat_template``), special_tokens_map.json,
    vocab.json and merges.txt for a GPT-2 BPE; returns the file names.
    ``tokenizer(text).input_ids`` equals our ``tokenize_with_specials(text)``: the ids trained
    on, ``<|endoftext|>`` in a text being the EOD, as in GPT-2's own tokenizer."""
    import shutil

    from tokenizers import AddedToken

    from megatron_slm.data.tokenizer import GPT2_EOD, GPT2BPETokenizer

    ours = GPT2BPETokenizer(vocab_file, merge_file)
    tok = ours.to_tokenizers()
    tok.add_special_tokens([AddedToken(GPT2_EOD, special=True, normalized=False)])
    write_text_atomic(os.path.join(save, "tokenizer.json"), tok.to_str())
    special = {"bos_token": GPT2_EOD, "eos_token": GPT2_EOD, "unk_token": GPT2_EOD}
    entry = {"content": GPT2_EOD, "special": True, "normalized": False}
    entry.update(lstrip=False, rstrip=False, single_word=False)
    _write_fast_config(save, special, {ours.eod: entry}, chat_template, add_prefix_space=False)
    shutil.copyfile(vocab_file, os.path.join(save, "vocab.json"))
    shutil.copyfile(merge_file, os.path.join(save, "merges.txt"))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] + [
        "vocab.json",
        "merges.txt",
    ]


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts whose merge makes ``token`` in tiktoken's BPE (lowest rank first, only
    ranks below the token's own); None when its bytes do not merge into it."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        best = None  # (rank, position) of the lowest-rank adjacent pair
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return None
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def write_tiktoken_hf_tokenizer(tok, save: str, chat_template: str) -> list[str]:
    """tokenizer.json, tokenizer_config.json (with ``chat_template``) and
    special_tokens_map.json for a ``data.tokenizer.TikTokenizer`` ``tok``: the same ids for any
    text (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from megatron_slm.data.tiktoken_tokenizer import PATTERNS, gpt2_byte_symbols

    symbol = {b[0]: s for s, b in gpt2_byte_symbols().items()}

    def text(t: bytes) -> str:
        return "".join(symbol[b] for b in t)

    tokens, specials = tok.token_bytes(), tok.specials
    ranks = {t: r for r, t in enumerate(tokens)}
    vocab = {s: i for i, s in enumerate(specials)}
    for r, t in enumerate(tokens):
        vocab.setdefault(text(t), len(specials) + r)  # a special's own string keeps its id
    merges = []
    for t in tokens[256:]:
        pair = _merge_of(t, ranks)
        if pair is not None:
            merges.append((text(pair[0]), text(pair[1])))
    bpe = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERNS[tok.options()["pattern"]]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    write_text_atomic(os.path.join(save, "tokenizer.json"), bpe.to_str())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    entry = {"special": True, "normalized": False, "lstrip": False, "rstrip": False}
    added = {i: {"content": s, **entry, "single_word": False} for i, s in enumerate(specials)}
    _write_fast_config(save, special, added, chat_template)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _write_fast_config(save: str, special: dict, added: dict, chat_template: str, **extra):
    """tokenizer_config.json (a ``PreTrainedTokenizerFast`` adding no BOS, with ``added``
    tokens by id and the chat template) and special_tokens_map.json."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(i): entry for i, entry in added.items()},
        **special,
        "add_bos_token": False,
        **extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "chat_template": chat_template,
    }
    write_json_atomic(os.path.join(save, "tokenizer_config.json"), config)
    write_json_atomic(os.path.join(save, "special_tokens_map.json"), special)


def set_chat_template(save: str, chat_template: str, overwrite: bool) -> bool:
    """Put ``chat_template`` into an exported HF tokenizer's tokenizer_config.json (when it has
    none, or always with ``overwrite``); a ``chat_template.jinja`` beside it, which transformers
    prefers, is replaced too. Returns whether the template was written."""
    path = os.path.join(save, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
    jinja = os.path.join(save, "chat_template.jinja")
    has = bool(config.get("chat_template")) or os.path.isfile(jinja)
    if has and not overwrite:
        return False
    config["chat_template"] = chat_template
    write_json_atomic(path, config)
    if os.path.isfile(jinja):
        write_text_atomic(jinja, chat_template)
    return True


def write_generation_config(save: str, bos: int | None, eos: int | None, pad: int | None) -> None:
    """generation_config.json: greedy by default, stops at ``eos``; pads with ``eos`` when the
    tokenizer has no pad token."""
    cfg = {"_from_model_config": False, "do_sample": False}
    if bos is not None and bos >= 0:
        cfg["bos_token_id"] = bos
    if eos is not None and eos >= 0:
        cfg["eos_token_id"] = eos
        cfg["pad_token_id"] = pad if pad is not None and pad >= 0 else eos
    write_json_atomic(os.path.join(save, "generation_config.json"), cfg)
