"""Tokenizers for preprocessing and for megatron-core's GPT datasets.

``build_tokenizer`` returns an object with the small surface both sides need:

- ``tokenize(text) -> list[int]`` and ``tokenize_batch(texts) -> list[list[int]]`` (the fast path
  used by preprocessing), ``detokenize(ids) -> str``;
- ``eod``, ``pad`` (``-1`` when the tokenizer has none), ``vocab_size``;
- ``unique_identifiers`` (an ``OrderedDict``: megatron-core's dataset cache key is built from it)
  and ``identity()`` (a short string recorded in sidecar metadata).

The classes subclass megatron-core's ``MegatronTokenizerBase`` so ``GPTDatasetConfig`` accepts them.

Token ids follow Megatron-LM's ``GPTSentencePieceTokenizer`` / ``Llama2Tokenizer`` (the same
sentencepiece ids, each text led by the BOS id) / ``GPT2BPETokenizer`` (``--vocab-file`` +
``--merge-file``) / ``HuggingFaceTokenizer`` / ``NullTokenizer`` (``--vocab-size V``: ids
``0 .. V - 1``, then its EOD ``V``; ``V + 1`` ids in all), with one documented difference: our
``SentencePieceTokenizer`` is Megatron-LM's ``GPTSentencePieceTokenizer`` (a name accepted for
it), not Megatron-LM's BERT/T5 ``SentencePieceTokenizer`` that appends ``<CLS>``/``<SEP>``/
``<EOD>``/... ids. Records (checkpoints, sidecars) hold every tokenizer's ids in all
(:func:`vocab_flag_of_record` maps a NullTokenizer's back to its flag).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_slm.atomic_io import file_sha256
from megatron_slm.cli import arg, flag_name
from megatron_slm.errors import ConfigError, InputFileError, TokenizerError
from megatron_slm.remote_code import RemoteCodeArgs, load_auto_tokenizer

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "TikTokenizer",
    "NullTokenizer",
)
# Megatron-LM's GPTSentencePieceTokenizer gives exactly our SentencePieceTokenizer's ids (the
# model's own, EOD its eos); recorded under the one name so checkpoints and flags agree.
TOKENIZER_ALIASES = {"GPTSentencePieceTokenizer": "SentencePieceTokenizer"}
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "Llama2Tokenizer")  # a .model file each
TIKTOKEN_FLAGS = ("tiktoken_pattern", "tiktoken_num_special_tokens", "tokenizer_special_tokens")
GPT2_EOD = "<|endoftext|>"


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


def _bpe_files_digest(vocab_file: str, merge_file: str, n_hex: int = 16) -> str:
    """Short sha256 over a GPT-2 BPE's two files (either one changes the ids)."""
    both = _file_digest(vocab_file, 64) + _file_digest(merge_file, 64)
    return hashlib.sha256(both.encode()).hexdigest()[:n_hex]


def model_digest(tokenizer_type: str, path: str, merge_file: str | None = None) -> str | None:
    """The ``sha256`` a tokenizer of this type built from ``path`` (a GPT2BPETokenizer's vocab
    file, with ``merge_file``) has in its ``unique_identifiers`` (what a checkpoint records),
    without building it; None when the type has no model file or a file does not exist."""
    if tokenizer_type in SENTENCEPIECE_TYPES and os.path.isfile(path):
        return _file_digest(path)
    if tokenizer_type == "HuggingFaceTokenizer" and os.path.isdir(path):
        return _directory_digest(path)
    if tokenizer_type == "TikTokenizer" and os.path.isfile(path):
        return _file_digest(path)
    if tokenizer_type == "GPT2BPETokenizer" and merge_file:
        if os.path.isfile(path) and os.path.isfile(merge_file):
            return _bpe_files_digest(path, merge_file)
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


def _read_gpt2_vocab(vocab_file: str) -> dict[str, int]:
    """vocab.json: ``{token: id}`` with the ids ``0..n-1``, each once."""
    flag = f"--vocab-file {vocab_file}"
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"not a JSON vocabulary ({e})", subject=flag) from None
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in vocab.items()
    ):
        raise TokenizerError("not a GPT-2 vocabulary: expected {token: id}", subject=flag)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise TokenizerError(f"the ids are not 0..{len(vocab) - 1}, each once", subject=flag)
    return vocab


def _read_gpt2_merges(merge_file: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """merges.txt: a ``#version`` line, then one merge ``a b`` per line, by rank. Megatron-LM
    drops the first line unread, so a file without the header would lose its first merge there:
    refused here rather than read differently."""
    flag = f"--merge-file {merge_file}"
    try:
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"not UTF-8 text ({e})", subject=flag) from None
    if not lines[0].startswith("#version"):
        raise TokenizerError(
            f"first line {lines[0][:40]!r} is not the '#version: ...' header of a GPT-2 merges "
            "file (Megatron-LM skips that line unread)",
            subject=flag,
        )
    merges = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(p in vocab for p in parts) or "".join(parts) not in vocab:
            raise TokenizerError(
                f"line {line_no}: {line[:60]!r} is not a merge of two tokens of the vocabulary "
                "into a third",
                subject=flag,
            )
        merges.append((parts[0], parts[1]))
    return merges


class GPT2BPETokenizer(_SLMTokenizer):
    """Megatron-LM's ``GPT2BPETokenizer``: GPT-2's byte-level BPE from a ``vocab.json`` and a
    ``merges.txt``. ``eod`` is ``<|endoftext|>``; ``tokenize`` adds nothing and treats that
    string in a text as plain text, as Megatron-LM's does; ids equal OpenAI's ``encoder.py`` (the
    algorithm Megatron-LM's ``gpt2_tokenization`` copies), computed by the ``tokenizers``
    library (a byte-level pre-tokenizer with GPT-2's regex, then the merges by rank)."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if path is None or not os.path.isfile(path):
                raise FileNotFoundError(f"{flag}: GPT-2 BPE file not found: {path!r}")
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise TokenizerError(
                "GPT2BPETokenizer needs the tokenizers package (pip install tokenizers)"
            ) from None
        vocab = _read_gpt2_vocab(vocab_file)
        if GPT2_EOD not in vocab:
            raise TokenizerError(
                f"no {GPT2_EOD} token to use as EOD", subject=f"--vocab-file {vocab_file}"
            )
        missing = set(pre_tokenizers.ByteLevel.alphabet()) - vocab.keys()
        if missing:  # a byte with no token would vanish from the ids (no unk in byte-level BPE)
            raise TokenizerError(
                f"not a byte-level vocabulary: {len(missing)} of the 256 byte symbols are missing",
                subject=f"--vocab-file {vocab_file}",
            )
        bpe = Tokenizer(models.BPE(vocab, _read_gpt2_merges(merge_file, vocab)))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        bpe.decoder = decoders.ByteLevel()
        self._bpe, self._vocab_size, self._eod = bpe, len(vocab), vocab[GPT2_EOD]
        self.vocab_file, self.merge_file = vocab_file, merge_file
        super().__init__(
            os.path.abspath(vocab_file),
            merge_file=os.path.abspath(merge_file),
            sha256=_bpe_files_digest(vocab_file, merge_file),
            vocab_size=len(vocab),
        )
        from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

        self.chat_template = DEFAULT_CHAT_TEMPLATE

    def to_tokenizers(self):
        """A copy of the ``tokenizers.Tokenizer`` computing these ids (for an export)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self._bpe.to_str())

    def __getstate__(self):
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file}

    def __setstate__(self, state):
        self.__init__(state["vocab_file"], state["merge_file"])

    def tokenize(self, text: str) -> list[int]:
        """Encode one text: ``list[int]``."""
        return self._bpe.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode a list of texts in one call."""
        return [e.ids for e in self._bpe.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode ids to text (invalid UTF-8 becomes U+FFFD: Megatron-LM's ``errors=replace``)."""
        return self._bpe.decode([int(i) for i in ids], skip_special_tokens=False)

    def chat_special_tokens(self) -> dict[str, str | None]:
        return {"bos_token": GPT2_EOD, "eos_token": GPT2_EOD, "unk_token": GPT2_EOD}

    def tokenize_with_specials(self, text: str) -> list[int]:
        """``<|endoftext|>`` becomes the EOD id; the text between is encoded plainly."""
        ids: list[int] = []
        for i, part in enumerate(text.split(GPT2_EOD)):
            if i:
                ids.append(self._eod)
            if part:
                ids += self.tokenize(part)
        return ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod


class TikTokenizer(_SLMTokenizer):
    """Megatron-LM's ``TikTokenizer`` (``data.tiktoken_tokenizer`` has its rules and ids)."""

    def __init__(self, path: str, vocab_size: int | None = None, **options) -> None:
        from megatron_slm.data.tiktoken_tokenizer import TikTokenIds

        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(f"tiktoken vocabulary file not found: {path!r}")
        self._ids = TikTokenIds(path, vocab_size=vocab_size, **options)
        self._state = (path, vocab_size, options)
        super().__init__(
            os.path.abspath(path),
            sha256=_file_digest(path),
            vocab_size=self._ids.vocab_size,
            **self._ids.options(),
        )
        from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

        self.chat_template = DEFAULT_CHAT_TEMPLATE

    def options(self) -> dict:
        """``--tiktoken-pattern``, ``--tiktoken-num-special-tokens``, ``--tokenizer-special-
        tokens`` as built (a checkpoint records them to rebuild these ids)."""
        return self._ids.options()

    def token_bytes(self) -> list[bytes]:
        """The BPE tokens in rank order (an export rebuilds the merges from them)."""
        return self._ids.token_bytes()

    @property
    def specials(self) -> list[str]:
        """The strings of the first ``num_special_tokens`` ids."""
        return self._ids.specials

    def __getstate__(self):
        return self._state

    def __setstate__(self, state):
        path, vocab_size, options = state
        self.__init__(path, vocab_size, **options)

    def tokenize(self, text: str) -> list[int]:
        return self._ids.tokenize(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._ids.tokenize_batch(texts)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._ids.detokenize(ids)

    def chat_special_tokens(self) -> dict[str, str | None]:
        return {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

    def tokenize_with_specials(self, text: str) -> list[int]:
        """Special-token strings become their ids, as ``tokenize`` already does."""
        return self._ids.tokenize(text)

    @property
    def vocab_size(self) -> int:
        return self._ids.vocab_size

    @property
    def eod(self) -> int:
        return self._ids.eod

    @property
    def pad(self) -> int:
        return self._ids.pad


class HuggingFaceTokenizer(_SLMTokenizer):
    """A Hugging Face tokenizer loaded from a local directory (no network). ``tokenize`` matches
    Megatron-LM's ``_HuggingFaceTokenizer`` (``tokenizer(text).input_ids``, special tokens such as
    BOS included); ``eod`` is the eos token."""

    def __init__(self, path: str, trust_remote_code: bool = False) -> None:
        if path is None or not os.path.isdir(path):
            raise FileNotFoundError(
                f"--tokenizer-model: Hugging Face tokenizer directory not found: {path!r}"
            )
        self._path, self._trust_remote_code = path, trust_remote_code
        self._tok = load_auto_tokenizer(path, trust_remote_code, f"--tokenizer-model {path}")
        if self._tok.eos_token_id is None:
            raise TokenizerError(f"Hugging Face tokenizer {path} has no eos token to use as EOD")
        super().__init__(
            os.path.abspath(path), sha256=_directory_digest(path), vocab_size=len(self._tok)
        )
        from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

        self.chat_template = getattr(self._tok, "chat_template", None) or DEFAULT_CHAT_TEMPLATE

    def __getstate__(self):
        return {"path": self._path, "trust_remote_code": self._trust_remote_code}

    def __setstate__(self, state):
        self.__init__(state["path"], state.get("trust_remote_code", False))

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
    """Megatron-LM's synthetic tokenizer: text is space-separated integer ids. ``--vocab-size V``
    gives the ids ``0 .. V - 1`` and then its EOD, ``V`` (``V + 1`` ids in all, as Megatron-LM
    pads them, so its NullTokenizer corpora and ``--mock-data`` models match ours)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise ConfigError(f"--vocab-size must be >= 1 for NullTokenizer, got {vocab_size!r}")
        self._eod = int(vocab_size)
        super().__init__(None, vocab_size=self.vocab_size)  # (the ids in all, as recorded)

    def tokenize(self, text: str) -> list[int]:
        """``"3 1 4" -> [3, 1, 4]``; ids must lie in ``[0, vocab_size]`` (the EOD included)."""
        ids = [int(x) for x in text.split()]
        for i in ids:
            if not 0 <= i <= self._eod:
                raise TokenizerError(f"NullTokenizer: id {i} outside [0, {self._eod}]")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """``[3, 1, 4] -> "3 1 4"``."""
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._eod + 1

    @property
    def eod(self) -> int:
        return self._eod


def vocab_flag_of_record(record: dict) -> int | None:
    """The ``--vocab-size`` that rebuilds a recorded tokenizer: a record holds the ids in all, a
    NullTokenizer's flag counts them without its EOD."""
    total = record.get("vocab_size")
    if total is None or record.get("type") != "NullTokenizer":
        return total
    return int(total) - 1


def check_trust_remote_code(trust_remote_code: bool, tokenizer_type: str) -> None:
    """--trust-remote-code is a HuggingFaceTokenizer's flag (ConfigError for another type)."""
    if trust_remote_code and tokenizer_type != "HuggingFaceTokenizer":
        raise ConfigError(
            f"--trust-remote-code is a HuggingFaceTokenizer's flag, not a {tokenizer_type}'s"
        )


def check_tokenizer_flags(cfg, *, files_required: bool = True) -> None:
    """The checks of a config's tokenizer flags (``tokenizer_type``, ``tokenizer_model``,
    ``vocab_file``, ``merge_file``, ``vocab_size``) that need no files, after mapping the type to
    our name: a known type, and each type's own flags (``--tokenizer-model``; ``--vocab-file`` +
    ``--merge-file``; ``--vocab-size``), the files required unless a checkpoint may name them
    (``files_required=False``)."""
    cfg.tokenizer_type = tokenizer_type = canonical_tokenizer_type(cfg.tokenizer_type)
    tokenizer_model, vocab_size = cfg.tokenizer_model, cfg.vocab_size
    vocab_file, merge_file = cfg.vocab_file, cfg.merge_file
    if tokenizer_type is None:
        if (vocab_file or merge_file) and tokenizer_model:
            raise ConfigError(
                "--vocab-file/--merge-file (a GPT2BPETokenizer's) and --tokenizer-model name "
                "two tokenizers: give one"
            )
        return
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ConfigError(
            f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, got {tokenizer_type!r}"
        )
    for name in TIKTOKEN_FLAGS:
        if getattr(cfg, name, None) is not None and tokenizer_type != "TikTokenizer":
            raise ConfigError(
                f"{flag_name(name)} is a TikTokenizer's flag, not a {tokenizer_type}'s"
            )
    check_trust_remote_code(getattr(cfg, "trust_remote_code", False), tokenizer_type)
    gpt2 = tokenizer_type == "GPT2BPETokenizer"
    if gpt2 and tokenizer_model:
        raise ConfigError(
            "--tokenizer-type GPT2BPETokenizer reads --vocab-file and --merge-file, "
            "not --tokenizer-model"
        )
    if not gpt2 and (vocab_file or merge_file):
        flag = "--vocab-file" if vocab_file else "--merge-file"
        raise ConfigError(
            f"{flag} is a GPT2BPETokenizer's file; --tokenizer-type {tokenizer_type} reads "
            + ("--vocab-size" if tokenizer_type == "NullTokenizer" else "--tokenizer-model")
        )
    if not files_required:
        return
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise ConfigError(f"--vocab-size must be >= 1 for NullTokenizer, got {vocab_size!r}")
    elif gpt2 and not (vocab_file and merge_file):
        raise ConfigError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    elif not gpt2 and not tokenizer_model:
        raise ConfigError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")


@dataclass
class TokenizerOptionArgs(RemoteCodeArgs):
    """Megatron-LM's flags of particular tokenizer types: its ``TikTokenizer``'s options
    (``data.tiktoken_tokenizer``) and, for a ``HuggingFaceTokenizer``, ``--trust-remote-code``."""

    tiktoken_pattern: str | None = arg(
        None,
        "TikTokenizer: Megatron-LM's pre-tokenizing regular expression, v1 or v2 (default v2; "
        "the --load checkpoint's when it records one).",
        choices=("v1", "v2"),
    )
    tiktoken_num_special_tokens: int | None = arg(
        None, "TikTokenizer: ids before the BPE tokens (default 1000, Megatron-LM's)."
    )
    tokenizer_special_tokens: list[str] | None = arg(
        None,
        "TikTokenizer: its special tokens (must include <unk> <s> </s> <mask> <pad> <cls> "
        "<sep>, Megatron-LM's defaults).",
        nargs="+",
        aliases=("--tiktoken-special-tokens",),
    )

    def tiktoken_options(self) -> dict:
        """The TikTokenizer options given (Megatron-LM's defaults for the others)."""
        given = {
            "pattern": self.tiktoken_pattern,
            "num_special_tokens": self.tiktoken_num_special_tokens,
            "special_tokens": self.tokenizer_special_tokens,
        }
        return {k: v for k, v in given.items() if v is not None}


@dataclass
class TokenizerArgs(TokenizerOptionArgs):
    """The tokenizer flags of the trainer and every tool (Megatron-LM's names)."""

    tokenizer_type: str | None = arg(
        None,
        "SentencePieceTokenizer (also GPTSentencePieceTokenizer, Megatron-LM's name for these "
        "ids), Llama2Tokenizer (the same ids, each text led by BOS), GPT2BPETokenizer, "
        "HuggingFaceTokenizer, TikTokenizer or NullTokenizer (default: the one the --load "
        "checkpoint records, else GPT2BPETokenizer when --vocab-file is given, else "
        "SentencePieceTokenizer).",
    )
    tokenizer_model: str | None = arg(
        None, "Tokenizer model file or directory (default: the one the --load checkpoint records)."
    )
    vocab_file: str | None = arg(
        None, "GPT2BPETokenizer's vocab.json (default: the one the --load checkpoint records)."
    )
    merge_file: str | None = arg(
        None, "GPT2BPETokenizer's merges.txt (default: the one the --load checkpoint records)."
    )
    vocab_size: int | None = arg(
        None,
        "NullTokenizer: its ids before the EOD (Megatron-LM's: ids 0 .. N-1, then EOD = N); a "
        "TikTokenizer's (its special ids included) cuts its file.",
    )

    def __post_init__(self):
        check_tokenizer_flags(self, files_required=False)


def canonical_tokenizer_type(tokenizer_type: str | None) -> str | None:
    """``--tokenizer-type`` with Megatron-LM's other names for the same ids mapped to ours."""
    return TOKENIZER_ALIASES.get(tokenizer_type, tokenizer_type)


def model_path_of(
    tokenizer_type: str | None, tokenizer_model: str | None, vocab_file: str | None
) -> str | None:
    """The path ``build_tokenizer`` takes as the model: a GPT2BPETokenizer's ``--vocab-file``,
    any other type's ``--tokenizer-model``."""
    return vocab_file if tokenizer_type == "GPT2BPETokenizer" else tokenizer_model


def tokenizer_of(cfg) -> _SLMTokenizer:
    """The tokenizer a config's tokenizer flags name (checked by :func:`check_tokenizer_flags`)."""
    model = model_path_of(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_file)
    return build_tokenizer(
        cfg.tokenizer_type, model, cfg.vocab_size, cfg.merge_file, cfg.tiktoken_options(),
        trust_remote_code=cfg.trust_remote_code,
    )  # fmt: skip


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    vocab_size: int | None = None,
    merge_file: str | None = None,
    tiktoken: dict | None = None,
    trust_remote_code: bool = False,
) -> _SLMTokenizer:
    """Build a tokenizer by Megatron-LM ``--tokenizer-type`` name.

    Args:
        tokenizer_type: one of ``TOKENIZER_TYPES``.
        tokenizer_model: sentencepiece ``.model`` file, Hugging Face tokenizer directory, a
            TikTokenizer's JSON vocabulary, or a GPT2BPETokenizer's ``vocab.json``
            (``--vocab-file``).
        vocab_size: the ``NullTokenizer``'s ids before its EOD (a TikTokenizer's: its cut).
        merge_file: a GPT2BPETokenizer's ``merges.txt`` (``--merge-file``).
        tiktoken: a TikTokenizer's ``pattern``, ``num_special_tokens``, ``special_tokens``.
        trust_remote_code: a HuggingFaceTokenizer may run the code its directory ships.
    """
    tokenizer_type = canonical_tokenizer_type(tokenizer_type)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "Llama2Tokenizer":
        return Llama2Tokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(tokenizer_model, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, trust_remote_code)
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(tokenizer_model, vocab_size, **(tiktoken or {}))
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ConfigError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}")


def train_gpt2_bpe(texts: Iterable[str], prefix: str, vocab_size: int) -> tuple[str, str]:
    """Train a small GPT-2 byte-level BPE and write ``PREFIX-vocab.json`` and
    ``PREFIX-merges.txt`` (the files of ``--vocab-file``/``--merge-file``); returns their paths.
    The 256 byte symbols and ``<|endoftext|>`` are always in the vocabulary, so any text
    round-trips."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [t for t in texts if t]
    if not texts:
        raise InputFileError("--input: no non-empty text to train a tokenizer on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=[GPT2_EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out_dir, name = os.path.split(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    vocab_file, merge_file = tok.model.save(out_dir, name)
    return vocab_file, merge_file


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
