"""SentencePiece model protos: reading, piece kinds, the BPE merge trace, reachability checks.

The model file is a ``ModelProto`` (``sentencepiece.sentencepiece_model_pb2``, shipped with the
``sentencepiece`` wheel; it needs ``protobuf``). Piece kinds: NORMAL pieces are learned; CONTROL
(``<s>``, ``</s>``), UNKNOWN, USER_DEFINED and BYTE (``<0x00>``..``<0xFF>``, byte fallback) are the
mandatory ones a pruned model keeps; UNUSED pieces are disabled and never kept.

BPE encoding in SentencePiece (``bpe_model.cc``): the normalized text starts as one symbol per
character (user-defined pieces as frozen symbols); repeatedly the adjacent pair whose concatenation
is a piece with the highest score is merged (ties: leftmost); leftover symbols that are not pieces
become byte pieces (byte fallback) or unknown. :func:`bpe_trace` replays this in Python on a
piece's own string; the pieces it creates are what that piece needs to stay producible.
"""

from __future__ import annotations

import os

from megatron_slm.errors import TokenizerError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MANDATORY_TYPES = (CONTROL, UNKNOWN, USER_DEFINED, BYTE)
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
PRUNABLE_MODEL_TYPES = ("unigram", "bpe")
WHITESPACE = "\u2581"  # "▁", SentencePiece's escaped space


class TokenizerModelError(TokenizerError):
    """A tokenizer model that cannot be read or pruned (names the flag and the file)."""


def model_pb2():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # protobuf missing
        raise TokenizerModelError(
            f"editing SentencePiece models needs the protobuf package ({e}): pip install protobuf"
        ) from None
    return sentencepiece_model_pb2


def load_model_proto(path: str, flag: str = "--tokenizer-model"):
    """The ``ModelProto`` of a SentencePiece ``.model`` file."""
    if not os.path.isfile(path):
        hint = (
            " (a Hugging Face tokenizer directory cannot be pruned)" if os.path.isdir(path) else ""
        )
        raise TokenizerModelError(f"{flag} {path}: no such SentencePiece model file{hint}")
    proto = model_pb2().ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise TokenizerModelError(f"{flag} {path}: not a SentencePiece model ({e})") from None
    if not len(proto.pieces):
        raise TokenizerModelError(f"{flag} {path}: not a SentencePiece model (no pieces)")
    return proto


def model_type(proto) -> str:
    return MODEL_TYPES.get(proto.trainer_spec.model_type, str(proto.trainer_spec.model_type))


def check_prunable(proto, path: str, flag: str = "--tokenizer-model") -> str:
    kind = model_type(proto)
    if kind not in PRUNABLE_MODEL_TYPES:
        raise TokenizerModelError(
            f"{flag} {path}: a SentencePiece {kind} model cannot be pruned (only "
            f"{' and '.join(PRUNABLE_MODEL_TYPES)} models can)"
        )
    return kind


def processor(proto):
    """A ``SentencePieceProcessor`` of an in-memory proto."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def raw_processor(proto):
    """A processor of ``proto`` with normalization switched off, so a piece's own string (with its
    literal ``▁``) is encoded exactly as it appears inside normalized text."""
    raw = type(proto)()
    raw.CopyFrom(proto)
    ns = raw.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = False
    raw.ClearField("denormalizer_spec")
    return processor(raw)


def unreachable_pieces(proto, ids: list[int] | None = None) -> list[int]:
    """Ids of NORMAL / USER_DEFINED pieces (among ``ids``) whose own string does not encode to
    exactly that piece with this model: pieces the model can never produce."""
    sp = raw_processor(proto)
    ids = range(len(proto.pieces)) if ids is None else ids
    check = [i for i in ids if proto.pieces[i].type in (NORMAL, USER_DEFINED)]
    encoded = sp.encode([proto.pieces[i].piece for i in check], num_threads=1)
    return [i for i, enc in zip(check, encoded) if enc != [i]]


def bpe_trace(text: str, scores: dict[str, float], frozen: tuple[str, ...] = ()) -> list[str]:
    """Replay SentencePiece's BPE merges on ``text``; returns the pieces created, in merge order
    (the last one is ``text`` itself when the model produces it from its own string).

    ``scores``: piece -> score of the pieces merges may create (NORMAL and USER_DEFINED).
    ``frozen``: user-defined pieces, matched first and never merged."""
    symbols: list[str] = []
    i = 0
    while i < len(text):
        match = next((u for u in frozen if text.startswith(u, i)), None)
        symbols.append(match or text[i])
        i += len(match) if match else 1
    frozen_set = set(frozen)
    created = []
    while len(symbols) > 1:
        best, best_score = -1, None
        for j in range(len(symbols) - 1):
            a, b = symbols[j], symbols[j + 1]
            if a in frozen_set or b in frozen_set:
                continue
            s = scores.get(a + b)
            # Higher score first, ties to the leftmost pair (SymbolPairComparator).
            if s is not None and (best_score is None or s > best_score):
                best, best_score = j, s
        if best < 0:
            break
        merged = symbols[best] + symbols[best + 1]
        symbols[best : best + 2] = [merged]
        created.append(merged)
    return created
