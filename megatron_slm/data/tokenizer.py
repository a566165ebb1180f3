"""Tokenizers for preprocessing and for megatron-core's GPT datasets.

``build_tokenizer`` returns an object with the small surface both sides need:

- ``tokenize(text) -> list[int]`` and ``tokenize_batch(texts) -> list[list[int]]`` (the fast path
  used by preprocessing), ``detokenize(ids) -> str``;
- ``eod``, ``pad`` (``-1`` when the tokenizer has none), ``vocab_size``;
- ``unique_identifiers`` (an ``OrderedDict``: megatron-core's dataset cache key is built from it)
  and ``identity()`` (a short string recorded in sidecar metadata).

The classes subclass megatron-core's ``MegatronTokenizerBase`` so ``GPTDatasetConfig`` accepts them.

Token ids follow Megatron-LM's ``GPTSentencePieceTokenizer`` / ``Llama2Tokenizer`` (the same
sentencepiece ids, each text led by the BOS id) / ``HuggingFaceTokenizer`` / ``NullTokenizer``,
with one documented difference: ``NullTokenizer(vocab_size)`` has exactly ``vocab_size`` ids and
``eod = vocab_size - 1`` (Megatron-LM appends the EOD after ``vocab_size``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_slm.atomic_io import file_sha256
from megatron_slm.cli import arg
from megatron_slm.errors import ConfigError, InputFileError, TokenizerError

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "Llama2Tokenizer")  # a .model file each


def _file_digest(path: str, n_hex: int = 16) -> str:
    """Short sha256 of a file (tokenizer models are small)."""
    return file_sha256(path)[:n_hex]


def _directory_digest(path: str, n_hex: int = 16) -> str:
    """Short sha256 over the tokenizer files of a Hugging Face tokenizer directory."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and ("token" in name or name.endswith((".model", ".json"))):
            digest.update(name.encode() + _file_digest(full).encode())
    return digest.hexdigest()[:n_hex]


def model_digest(tokenizer_type: str, path: str) -> str | None:
    """The ``sha256`` a tokenizer of this type built from ``path`` has in its
    ``unique_identifiers`` (what a checkpoint records), without building it; None when the type
    has no model file or ``path`` does not exist."""
    if tokenizer_type in SENTENCEPIECE_TYPES and os.path.isfile(path):
        return _file_digest(path)
    if tokenizer_type == "HuggingFaceTokenizer" and os.path.isdir(path):
        return _directory_digest(path)
    return None


class _SLMTokenizer(MegatronTokenizerBase):
    """Common base: megatron-core's abstract tokenizer plus the helpers preprocessing needs."""

    def __init__(self, path: str | None, **identifiers) -> None:
        super().__init__(path or "", {})
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("path", path)] + list(identifiers.items())
        )

    # -- megatron-core abstract surface --------------------------------------------------------
    def vocab(self):  # noqa: D102 - not needed by the data pipeline
        raise NotImplementedError(f"{type(self).__name__} does not expose its vocabulary")

    # -- chat (SFT): see data/chat.py ------------------------------------------------------------
    chat_template: str | None = None
    """Jinja chat template (None: the tokenizer has none; the NullTokenizer)."""

    def chat_special_tokens(self) -> dict[str, str | None]:
        """``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` strings for templates."""
        return {}

    def tokenize_with_specials(self, text: str) -> list[int]:
        """Ids of ``text`` in which special-token strings (``<s>``, ``</s>``, ...) become their
        ids, as a Hugging Face tokenizer encodes a rendered chat prompt."""
        raise NotImplementedError(f"{type(self).__name__} has no special tokens")

    def apply_chat_template(
        self, messages, add_generation_prompt: bool = False, tokenize: bool = True, **_unused
    ):
        """Like transformers' ``apply_chat_template``: rendered text or its ids."""
        from megatron_slm.data.chat import ChatTemplateError, render_chat

        if not self.chat_template:
            raise ChatTemplateError(f"{type(self).__name__} has no chat template")
        text = render_chat(
            self.chat_template, messages, self.chat_special_tokens(), add_generation_prompt
        )
        return self.tokenize_with_specials(text) if tokenize else text

    # -- helpers ---------------------------------------------------------------------------------
    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize several texts (subclasses override with a batched call)."""
        return [self.tokenize(t) for t in texts]

    def tokenize_plain(self, text: str) -> list[int]:
        """Ids of ``text`` without the ids ``tokenize`` adds around it (a Llama2Tokenizer's
        BOS): a continuation of a text already begun."""
        return self.tokenize(text)

    bos: int | None = None
    """The id ``tokenize`` puts before each text (None: it adds none)."""

    @property
    def pad(self) -> int:
        """Padding id, ``-1`` when the tokenizer has none (megatron-core's own default)."""
        return -1

    @property
    def eos(self) -> int:
        """Same as ``eod``."""
        return self.eod

    def identity(self) -> str:
        """Short string identifying the tokenizer (class, model digest, vocab size)."""
        parts = [f"{k}={v}" for k, v in self.unique_identifiers.items() if k not in ("path",)]
        return ",".join(parts)


class SentencePieceTokenizer(_SLMTokenizer):
    """A sentencepiece model; ``eod`` is the model's ``</s>`` (eos) id, like Megatron-LM's
    ``GPTSentencePieceTokenizer``; ids equal ``sp.encode(text)`` exactly."""

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        if model_file is None or not os.path.isfile(model_file):
            raise FileNotFoundError(
                f"--tokenizer-model: sentencepiece model not found: {model_file!r}"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as e:  # sentencepiece: "could not parse ModelProto"
            raise TokenizerError(
                f"not a valid sentencepiece model ({' '.join(str(e).split())})",
                subject=f"--tokenizer-model {model_file}",
                hint="give the .model file written by sentencepiece or tools/train_tokenizer.py",
            ) from None
        self._model_file = model_file
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"sentencepiece model {model_file} has no eos piece to use as EOD")
        super().__init__(
            os.path.abspath(model_file),
            sha256=_file_digest(model_file),
            vocab_size=self._sp.get_piece_size(),
        )
        from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

        self.chat_template = DEFAULT_CHAT_TEMPLATE
        # Control and unknown pieces: the special tokens of the exported HF tokenizer too.
        sp = self._sp
        self.special_pieces = {
            sp.id_to_piece(i): i
            for i in range(sp.get_piece_size())
            if sp.is_control(i) or sp.is_unknown(i)
        }

    def __getstate__(self):
        return {"model_file": self._model_file}

    def __setstate__(self, state):
        self.__init__(state["model_file"])

    def tokenize(self, text: str) -> list[int]:
        """Encode one text: ``list[int]``."""
        return self._sp.encode(text, num_threads=1)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode a list of texts in one call (single-threaded: one process = one core)."""
        return self._sp.encode(list(texts), num_threads=1)

    def tokenize_plain(self, text: str) -> list[int]:
        return self._sp.encode(text, num_threads=1)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode ids to text."""
        return self._sp.decode([int(i) for i in ids])

    def chat_special_tokens(self) -> dict[str, str | None]:
        sp = self._sp

        def piece(i):
            return sp.id_to_piece(i) if i >= 0 else None

        return {
            "bos_token": piece(sp.bos_id()),
            "eos_token": piece(sp.eos_id()),
            "unk_token": piece(sp.unk_id()),
            "pad_token": piece(sp.pad_id()),
        }

    def tokenize_with_specials(self, text: str) -> list[int]:
        """Special pieces' strings become their ids; the text between them is encoded
        separately (each part with sentencepiece's dummy prefix, as the exported tokenizer)."""
        import re

        if not self.special_pieces:
            return self.tokenize_plain(text)
        names = sorted(self.special_pieces, key=len, reverse=True)
        ids: list[int] = []
        for part in re.split("(" + "|".join(map(re.escape, names)) + ")", text):
            if part in self.special_pieces:
                ids.append(self.special_pieces[part])
            elif part:
                ids += self.tokenize_plain(part)
        return ids

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id()  # -1 when the model has no pad piece


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's ``Llama2Tokenizer``: a sentencepiece model whose ``tokenize`` puts the BOS id
    before each text (a document's first token in preprocessed data), as Llama 2 was trained;
    ``eod`` is the eos id. The exported Hugging Face tokenizer adds the BOS the same way."""

    def __init__(self, model_file: str) -> None:
        super().__init__(model_file)
        if self._sp.bos_id() < 0:
            raise TokenizerError(
                f"sentencepiece model {model_file} has no bos piece for the Llama2Tokenizer "
                "to lead each text with (SentencePieceTokenizer adds none)"
            )
        self.bos = self._sp.bos_id()

    def tokenize(self, text: str) -> list[int]:
        """``[bos] + sentencepiece ids``."""
        return [self.bos, *self._sp.encode(text, num_threads=1)]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.bos, *ids] for ids in self._sp.encode(list(texts), num_threads=1)]


class HuggingFaceTokenizer(_SLMTokenizer):
    """A Hugging Face tokenizer loaded from a local directory (no network). ``tokenize`` matches
    Megatron-LM's ``_HuggingFaceTokenizer`` (``tokenizer(text).input_ids``, special tokens such as
    BOS included); ``eod`` is the eos token."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        if path is None or not os.path.isdir(path):
            raise FileNotFoundError(
                f"--tokenizer-model: Hugging Face tokenizer directory not found: {path!r}"
            )
        self._path = path
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:  # no/garbled tokenizer files
            raise TokenizerError(
                f"cannot load a Hugging Face tokenizer ({' '.join(str(e).split())[:300]})",
                subject=f"--tokenizer-model {path}",
            ) from None
        if self._tok.eos_token_id is None:
            raise TokenizerError(f"Hugging Face tokenizer {path} has no eos token to use as EOD")
        super().__init__(
            os.path.abspath(path), sha256=_directory_digest(path), vocab_size=len(self._tok)
        )
        from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

        self.chat_template = getattr(self._tok, "chat_template", None) or DEFAULT_CHAT_TEMPLATE

    def __getstate__(self):
        return {"path": self._path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def tokenize(self, text: str) -> list[int]:
        """Encode one text: ``list[int]``."""
        return self._tok(text).input_ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode a list of texts in one call."""
        return self._tok(list(texts)).input_ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode ids to text."""
        return self._tok.decode([int(i) for i in ids])

    def chat_special_tokens(self) -> dict[str, str | None]:
        t = self._tok
        return {
            "bos_token": t.bos_token,
            "eos_token": t.eos_token,
            "unk_token": t.unk_token,
            "pad_token": t.pad_token,
        }

    def tokenize_with_specials(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False).input_ids

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    @property
    def pad(self) -> int:
        pad = self._tok.pad_token_id
        return -1 if pad is None else pad


class NullTokenizer(_SLMTokenizer):
    """Synthetic tokenizer for tests: text is space-separated integer ids. ``vocab_size`` ids in
    total, the last one (``vocab_size - 1``) is EOD."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 2:
            raise ConfigError(f"--vocab-size must be >= 2 for NullTokenizer, got {vocab_size!r}")
        self._vocab_size = int(vocab_size)
        super().__init__(None, vocab_size=self._vocab_size)

    def tokenize(self, text: str) -> list[int]:
        """``"3 1 4" -> [3, 1, 4]``; ids must lie in ``[0, vocab_size)``."""
        ids = [int(x) for x in text.split()]
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise TokenizerError(f"NullTokenizer: id {i} outside [0, {self._vocab_size})")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """``[3, 1, 4] -> "3 1 4"``."""
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1


@dataclass
class TokenizerArgs:
    """The tokenizer flags of the trainer and every tool (Megatron-LM's names)."""

    tokenizer_type: str | None = arg(
        None,
        "SentencePieceTokenizer, Llama2Tokenizer (the same ids, each text led by BOS), "
        "HuggingFaceTokenizer or NullTokenizer (default: the one the --load checkpoint records, "
        "else SentencePieceTokenizer).",
    )
    tokenizer_model: str | None = arg(
        None, "Tokenizer model file or directory (default: the one the --load checkpoint records)."
    )
    vocab_size: int | None = arg(None, "Number of ids of the NullTokenizer (NullTokenizer only).")

    def __post_init__(self):
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(
                f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, "
                f"got {self.tokenizer_type!r}"
            )


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str | None = None, vocab_size: int | None = None
) -> _SLMTokenizer:
    """Build a tokenizer by Megatron-LM ``--tokenizer-type`` name.

    Args:
        tokenizer_type: one of ``TOKENIZER_TYPES``.
        tokenizer_model: sentencepiece ``.model`` file or Hugging Face tokenizer directory.
        vocab_size: number of ids of the ``NullTokenizer``.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ConfigError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}")


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    **options,
) -> str:
    """Train a small sentencepiece model (works on a few KB of text) and return its path.

    ``byte_fallback`` plus identity normalization make any unicode text round-trip exactly
    (``detokenize(tokenize(t)) == t``); ``hard_vocab_limit=False`` lets a tiny
    corpus yield fewer pieces than ``vocab_size`` instead of failing. Ids: unk 0, bos 1, eos 2
    (the EOD), no pad.
    """
    import sentencepiece as spm

    texts = [t for t in texts if t]
    if not texts:
        raise InputFileError("--input: no non-empty text to train a tokenizer on")
    kwargs = dict(
        model_prefix=model_prefix,
        vocab_size=int(vocab_size),
        model_type=model_type,
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",  # no NFKC: decode(encode(text)) == text
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
        max_sentence_length=1 << 20,
    )
    kwargs.update(options)
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), **kwargs)
    except RuntimeError as exc:
        if created:  # a failed run leaves nothing behind (the trainer writes only at the end)
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        # Every character seen (and the 256 byte pieces and the specials) needs a piece of its
        # own: sentencepiece says so as "... required_chars. 20 vs 266. ..."
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(exc))
        if need is None:
            raise
        raise ConfigError(
            f"--vocab-size {vocab_size} is too small for this text: sentencepiece needs at least "
            f"{need.group(1)} pieces (one per character seen, 256 byte pieces and the specials)"
        ) from None
    return model_prefix + ".model"
