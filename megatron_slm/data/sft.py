"""Supervised fine-tuning data: chat-format JSONL examples, packed into training sequences.

Input: JSONL files, one example per line, ``{"messages": [{"role": ..., "content": ...}, ...]}``
(roles ``system``, ``user``, ``assistant``; at least one assistant turn). Each example is rendered
with the tokenizer's chat template and tokenized with an assistant-token mask
(``data.chat.tokenize_chat``): an example of ``n`` tokens gives ``n - 1`` predictions, and the loss
mask is 1 where the *label* is an assistant token (content and the ``eos`` that ends the turn).

Packing (:class:`SFTDataset`): per epoch, the examples are shuffled by ``seed + epoch`` and laid
one after another into rows of ``seq_length`` positions (next-fit: an example that does not fit in
the current row starts a new one; the rest of the row is padding, loss mask 0). Each row carries
``position_ids`` restarting at 0 for every example and ``segment_ids`` (the example's slot in the
row; padding is one more segment of its own, so no attention row is empty). The trainer turns
``segment_ids`` into a block-diagonal causal attention mask: no example attends to another, and an
example's per-token losses equal those of its unpacked forward.

Examples longer than ``seq_length + 1`` tokens are truncated to their first ``seq_length + 1``
tokens (``too_long="truncate"``, dropped when no assistant label is left) or dropped
(``"drop"``); both are counted in :attr:`SFTDataset.stats` and logged.

Samples are rows of the epochs in order, as many epochs as ``num_samples`` needs (or exactly
``epochs``); sample ``i`` is a pure function of the files, tokenizer, ``seq_length``, ``seed`` and
``i``, so the trainer's consumed-sample count resumes it exactly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np

from megatron_slm.data.chat import ChatTemplateError, tokenize_chat
from megatron_slm.errors import InputFileError

logger = logging.getLogger("megatron_slm")

TOO_LONG = ("truncate", "drop")


class SFTDataError(InputFileError):
    """Bad SFT input: the message names the file and line."""


def _check_example(obj, where: str) -> list[dict]:
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise SFTDataError(f"{where}: expected an object with a 'messages' list")
    messages = obj["messages"]
    for k, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise SFTDataError(
                f"{where}: messages[{k}] must be an object with string 'role' and 'content'"
            )
        if m["role"] not in ("system", "user", "assistant"):
            raise SFTDataError(
                f"{where}: messages[{k}] role {m['role']!r}: expected system, user or assistant"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise SFTDataError(f"{where}: no assistant message (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_sft_examples(paths: list[str], flag: str = "--sft-data") -> list[list[dict]]:
    """All examples of the files, in order. Blank lines are skipped; anything else that is not a
    valid example raises :class:`SFTDataError` naming ``flag``, the file and the line."""
    examples = []
    for path in paths:
        try:
            f = open(path, encoding="utf-8")
        except OSError as exc:
            raise SFTDataError(f"{flag} {path}: cannot read ({exc.strerror})") from None
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{flag} {path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SFTDataError(f"{where}: invalid JSON ({exc.msg})") from None
                examples.append(_check_example(obj, where))
    if not examples:
        raise SFTDataError(f"{flag} {', '.join(paths)}: no examples")
    return examples


@dataclass
class SFTStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    assistant_labels: int = 0
    rows_per_epoch: list[int] = field(default_factory=list)


def tokenize_examples(
    tokenizer, examples: list[list[dict]], seq_length: int, too_long: str, stats: SFTStats
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(ids [n], label_mask [n - 1])]`` with ``n - 1 <= seq_length``; too-long examples are
    truncated or dropped and counted."""
    out = []
    for messages in examples:
        try:
            ids, mask = tokenize_chat(tokenizer, messages)
        except ChatTemplateError as exc:
            raise SFTDataError(f"--sft-data: {exc}") from None
        ids = np.asarray(ids, dtype=np.int64)
        label_mask = np.asarray(mask[1:], dtype=np.int64)  # label i+1 is predicted at input i
        if len(ids) - 1 > seq_length:
            if too_long == "drop":
                stats.dropped += 1
                continue
            ids, label_mask = ids[: seq_length + 1], label_mask[:seq_length]
            if not label_mask.any():
                stats.dropped += 1
                continue
            stats.truncated += 1
        if len(ids) < 2:
            stats.dropped += 1
            continue
        stats.tokens += len(ids)
        stats.assistant_labels += int(label_mask.sum())
        out.append((ids, label_mask))
    stats.examples = len(out)
    return out


def pack_epoch(lengths: list[int], order: np.ndarray, seq_length: int) -> list[list[int]]:
    """Rows of example indices (next-fit in ``order``); ``lengths`` = positions per example."""
    rows: list[list[int]] = []
    used = seq_length  # forces a first row
    for i in order:
        n = lengths[i]
        if used + n > seq_length:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += n
    return rows


class SFTDataset:
    """Packed SFT rows as trainer samples (``tokens``, ``labels``, ``loss_mask``,
    ``position_ids``, ``segment_ids``: ``[seq_length]`` each); see the module docstring."""

    def __init__(
        self,
        tokenizer,
        paths: list[str],
        seq_length: int,
        seed: int,
        num_samples: int,
        epochs: int | None = None,
        too_long: str = "truncate",
    ):
        if too_long not in TOO_LONG:
            raise SFTDataError(f"--sft-too-long must be one of {TOO_LONG}, got {too_long!r}")
        self.seq_length, self.seed = seq_length, seed
        self.pad_id = max(tokenizer.eod, 0)
        self.stats = SFTStats()
        self.examples = tokenize_examples(
            tokenizer, read_sft_examples(paths), seq_length, too_long, self.stats
        )
        if not self.examples:
            raise SFTDataError(
                f"--sft-data: every example is longer than --seq-length {seq_length} + 1 tokens "
                f"and --sft-too-long is {too_long}"
            )
        lengths = [len(ids) - 1 for ids, _ in self.examples]
        self.rows: list[list[int]] = []
        epoch = 0
        while (epochs is None and len(self.rows) < num_samples) or (
            epochs is not None and epoch < epochs
        ):
            order = np.random.default_rng([seed, epoch]).permutation(len(self.examples))
            rows = pack_epoch(lengths, order, seq_length)
            self.stats.rows_per_epoch.append(len(rows))
            self.rows += rows
            epoch += 1
        logger.info(
            "SFT data: %d examples (%d truncated, %d dropped: longer than --seq-length %d + 1), "
            "%d tokens, %d assistant labels; %d rows per epoch, %d epoch(s)",
            self.stats.examples,
            self.stats.truncated,
            self.stats.dropped,
            seq_length,
            self.stats.tokens,
            self.stats.assistant_labels,
            self.stats.rows_per_epoch[0],
            epoch,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.arange(s, dtype=np.int64)
        segment_ids = np.full(s, len(self.rows[idx]), dtype=np.int64)  # padding: its own segment
        pos = 0
        for k, i in enumerate(self.rows[idx]):
            ids, mask = self.examples[i]
            n = len(ids) - 1
            tokens[pos : pos + n] = ids[:-1]
            labels[pos : pos + n] = ids[1:]
            loss_mask[pos : pos + n] = mask
            position_ids[pos : pos + n] = np.arange(n)
            segment_ids[pos : pos + n] = k
            pos += n
        if pos < s:
            position_ids[pos:] = np.arange(s - pos)
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
        }
