"""Megatron-LM's ``TikTokenizer``: a tiktoken byte-level BPE read from Megatron-LM's JSON vocabulary
file, with its ids.

The file (``--tokenizer-model``, ``*.json``) is a list of ``{"rank", "token_bytes" (base64),
"token_str"}`` in rank order; the first 256 entries are the single bytes. Megatron-LM puts
``--tiktoken-num-special-tokens`` ids (default 1000) first: its special tokens (``<unk>``, ``<s>``,
``</s>``, ``<mask>``, ``<pad>``, ``<cls>``, ``<sep>``, or ``--tokenizer-special-tokens``, which must
include those) then fillers ``<SPECIAL_i>``; the file's rank ``r`` is id ``r + num_special``.
``--vocab-size`` counts both and cuts the file (Megatron-LM's default ``2**17``: here the file's
own size when it is smaller, where Megatron-LM would stop on an assertion). The text is split by
Megatron-LM's ``v1`` or ``v2`` (default) regular expression before the merges.

As in Megatron-LM, ``tokenize`` encodes special-token strings found in a text as their ids
(tiktoken's ``allowed_special="all"``) and adds nothing around the text; ``eod`` is ``</s>``.
Tested against megatron-core's own ``TikTokenTokenizer`` (``tests/unit/data``).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Sequence

from megatron_slm.errors import ConfigError, InputFileError, TokenizerError

PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
"""Megatron-LM's ``--tiktoken-pattern`` choices (its ``_PATTERN_TIKTOKEN_V1``/``_V2``)."""
DEFAULT_PATTERN = "v2"
DEFAULT_NUM_SPECIAL_TOKENS = 1000
MAX_VOCAB = 2**17  # Megatron-LM's DEFAULT_TIKTOKEN_MAX_VOCAB
REQUIRED_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")


def read_ranks(path: str, limit: int | None = None) -> list[bytes]:
    """The token bytes of Megatron-LM's tiktoken JSON file, in rank order (the first ``limit``);
    a malformed file is one line naming it."""
    where = f"--tokenizer-model {path}"
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except FileNotFoundError:
        raise InputFileError("tiktoken vocabulary file not found", subject=where) from None
    except (OSError, ValueError, RecursionError) as e:
        raise InputFileError(f"not a tiktoken JSON vocabulary ({e})", subject=where) from None
    if not isinstance(entries, list) or len(entries) < 256:
        raise InputFileError(
            "not a tiktoken JSON vocabulary: a list of at least the 256 byte tokens",
            subject=where,
        )
    ranks: list[bytes] = []
    for i, entry in enumerate(entries[:limit]):
        if not isinstance(entry, dict) or entry.get("rank") != i or "token_bytes" not in entry:
            raise InputFileError(
                f"entry {i} is not {{'rank': {i}, 'token_bytes': ..., 'token_str': ...}}",
                subject=where,
            )
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (ValueError, TypeError):
            raise InputFileError(f"entry {i}: token_bytes is not base64", subject=where) from None
        if i < 256 and token != bytes([i]):
            raise InputFileError(f"entry {i} must be the single byte {i}", subject=where)
        ranks.append(token)
    if len(set(ranks)) != len(ranks):
        raise InputFileError("two entries have the same token bytes", subject=where)
    return ranks


def special_tokens_of(special_tokens: Sequence[str] | None, num_special_tokens: int) -> list[str]:
    """The ``num_special_tokens`` strings of the first ids: the given ones, then fillers."""
    given = list(special_tokens or REQUIRED_SPECIAL_TOKENS)
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in given]
    if missing:
        raise ConfigError(f"--tokenizer-special-tokens must include {', '.join(missing)}")
    if len(set(given)) != len(given):
        raise ConfigError("--tokenizer-special-tokens: each token once")
    if len(given) > num_special_tokens:
        raise ConfigError(
            f"--tiktoken-num-special-tokens {num_special_tokens} is fewer than the "
            f"{len(given)} special tokens"
        )
    return given + [f"<SPECIAL_{i}>" for i in range(len(given), num_special_tokens)]


class TikTokenIds:
    """The ids of Megatron-LM's ``TikTokenizer`` (the module docstring has the rules);
    ``data.tokenizer.TikTokenizer`` gives them the common tokenizer surface."""

    def __init__(
        self,
        path: str,
        pattern: str = DEFAULT_PATTERN,
        num_special_tokens: int = DEFAULT_NUM_SPECIAL_TOKENS,
        special_tokens: Sequence[str] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        try:
            import tiktoken
        except ImportError:
            raise TokenizerError(
                "TikTokenizer needs the tiktoken package (pip install tiktoken)"
            ) from None
        if pattern not in PATTERNS:
            raise ConfigError(f"--tiktoken-pattern must be v1 or v2, got {pattern!r}")
        self.special_tokens = list(special_tokens or REQUIRED_SPECIAL_TOKENS)
        self.specials = special_tokens_of(special_tokens, num_special_tokens)
        limit = None if vocab_size is None else vocab_size - num_special_tokens
        if limit is not None and limit < 256:
            raise ConfigError(
                f"--vocab-size {vocab_size} leaves fewer than the 256 byte tokens after "
                f"{num_special_tokens} special tokens"
            )
        ranks = read_ranks(path, limit if limit is not None else MAX_VOCAB - num_special_tokens)
        if limit is not None and len(ranks) < limit:
            raise ConfigError(
                f"--vocab-size {vocab_size}: {path} has {len(ranks)} tokens, so at most "
                f"{len(ranks) + num_special_tokens} ids with {num_special_tokens} special ones"
            )
        self.path, self.pattern = path, pattern
        self.num_special_tokens = num_special_tokens
        self.vocab_size = num_special_tokens + len(ranks)
        self._token_bytes = ranks
        self.encoding = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=PATTERNS[pattern],
            mergeable_ranks={t: r + num_special_tokens for r, t in enumerate(ranks)},
            special_tokens={t: i for i, t in enumerate(self.specials)},
        )
        self.eod = self.specials.index("</s>")
        self.pad = self.specials.index("<pad>")

    def options(self) -> dict:
        """What rebuilds these ids besides the file (a checkpoint records it)."""
        return {
            "pattern": self.pattern,
            "num_special_tokens": self.num_special_tokens,
            "special_tokens": self.special_tokens,
        }

    def tokenize(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_batch(list(texts), allowed_special="all", num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Special ids decode to their strings; invalid UTF-8 to U+FFFD, as in Megatron-LM."""
        return self.encoding.decode([int(i) for i in ids])

    def token_bytes(self) -> list[bytes]:
        """The BPE tokens' bytes in rank order (ids ``num_special_tokens`` on)."""
        return list(self._token_bytes)


def write_ranks(path: str, tokens: Sequence[bytes]) -> str:
    """Write Megatron-LM's tiktoken JSON vocabulary of ``tokens`` (bytes in rank order, the 256
    single bytes first)."""
    entries = [
        {
            "rank": r,
            "token_bytes": base64.b64encode(t).decode("ascii"),
            "token_str": t.decode("utf-8", errors="replace"),
        }
        for r, t in enumerate(tokens)
    ]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    return path


def train_tiktoken(texts: Iterable[str], path: str, vocab_size: int) -> str:
    """Train a small byte-level BPE (``tokenizers``) and write it as Megatron-LM's tiktoken JSON
    ``path``: the 256 bytes, then each merge's token in merge order (a merge's rank is its
    order, which is what tiktoken's lowest-rank-first merging needs). ``vocab_size`` counts the
    BPE tokens only (no special ids)."""
    import tempfile

    from megatron_slm.data.tokenizer import _read_gpt2_merges, _read_gpt2_vocab, train_gpt2_bpe

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merge_file = train_gpt2_bpe(texts, os.path.join(tmp, "bpe"), vocab_size)
        merges = _read_gpt2_merges(merge_file, _read_gpt2_vocab(vocab_file))
    to_byte = gpt2_byte_symbols()
    tokens = [bytes([i]) for i in range(256)]
    seen = set(tokens)
    for left, right in merges:
        token = b"".join(to_byte[c] for c in left + right)
        if token not in seen:
            seen.add(token)
            tokens.append(token)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_ranks(path, tokens)


def gpt2_byte_symbols() -> dict[str, bytes]:
    """GPT-2's byte-level alphabet: the printable symbol standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = bytes([b])
        else:
            symbols[chr(256 + extra)] = bytes([b])
            extra += 1
    return symbols
