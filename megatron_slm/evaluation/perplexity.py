"""Mean token loss and perplexity of a model on datasets (JSONL or megatron indexed datasets).

Every document is cut into segments of at most ``seq_length + 1`` tokens that overlap by one
token: segment ``k`` covers tokens ``[k L, k L + L]`` and predicts its tokens ``1..`` from the
tokens before them within the segment (context resets at segment boundaries). Thus every token but
the first of each document is predicted exactly once, like the reference-loss sidecar. The loss is
the cross entropy over the real vocabulary (TP padding excluded); perplexity = exp(mean loss) over
all predicted tokens of the dataset.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_slm.data.jsonl import iter_jsonl
from megatron_slm.errors import ConfigError, InputFileError
from megatron_slm.runtime import LoadedModel, sequence_losses


@dataclass
class PerplexityResult:
    name: str
    path: str
    documents: int
    tokens: int
    loss_sum: float
    mean_loss: float
    perplexity: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def segments(doc: Sequence[int], seq_length: int) -> Iterator[list[int]]:
    """Segments of ``seq_length + 1`` tokens overlapping by one (the last one may be shorter)."""
    if seq_length < 1:
        raise ConfigError(f"--seq-length must be >= 1, got {seq_length}")
    doc = list(doc)
    for start in range(0, max(len(doc) - 1, 0), seq_length):
        yield doc[start : start + seq_length + 1]


def read_documents(
    path: str, tokenizer=None, json_key: str = "text", append_eod: bool = False
) -> Iterator[list[int]]:
    """Token ids of each document: ``*.jsonl`` (tokenized with ``tokenizer``; a ``tokens`` list
    field is used as is) or an indexed dataset prefix (``<path>.bin/.idx``)."""
    if path.endswith((".jsonl", ".json")) and os.path.isfile(path):
        for line_no, record in iter_jsonl(path):
            if "tokens" in record and json_key not in record:
                ids = [int(t) for t in record["tokens"]]
            else:
                if json_key not in record:
                    raise InputFileError(f"{path}:{line_no}: no {json_key!r} field")
                if tokenizer is None:
                    raise InputFileError(f"{path}: text data needs a tokenizer")
                ids = list(tokenizer.tokenize(record[json_key]))
            if append_eod:
                ids.append(tokenizer.eod)
            yield ids
        return
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_documents(path)  # a missing or damaged dataset names its flag and file
    dataset = IndexedDataset(path)
    for i in range(len(dataset)):
        yield np.asarray(dataset[i]).astype(np.int64).tolist()


def check_documents(path: str, flag: str = "--perplexity-data") -> None:
    """``path`` is a JSONL file, or a consistent indexed dataset prefix; raises
    ``InputFileError`` naming ``flag`` and the path."""
    from megatron_slm.data.index_file import read_index

    if path.endswith((".jsonl", ".json")) and os.path.isfile(path):
        return
    if not (os.path.isfile(path + ".bin") or os.path.isfile(path + ".idx")):
        raise InputFileError(
            "no such file, and no indexed dataset PATH.bin/.idx",
            subject=f"{flag} {path}",
            hint="give a .jsonl file or a tokenized dataset prefix",
        )
    read_index(path, flag=flag)


@torch.no_grad()
def evaluate_perplexity(
    m: LoadedModel,
    documents: Iterator[Sequence[int]],
    *,
    seq_length: int,
    micro_batch_size: int = 4,
    name: str = "data",
    path: str = "",
    max_documents: int | None = None,
) -> PerplexityResult:
    """Sum of per-token losses, token count, mean loss and perplexity over ``documents``."""
    if seq_length > m.arch.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {seq_length} exceeds the model's {m.arch.max_position_embeddings}"
        )
    loss_sum, n_tokens, n_docs = 0.0, 0, 0
    batch: list[list[int]] = []

    def flush():
        nonlocal loss_sum, n_tokens
        if not batch:
            return
        width = max(len(s) for s in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)  # [b, s + 1]
        mask = torch.zeros(len(batch), width - 1, dtype=torch.bool)  # [b, s]
        for i, seg in enumerate(batch):
            tokens[i, : len(seg)] = torch.tensor(seg)
            mask[i, : len(seg) - 1] = True
        losses = sequence_losses(m, tokens).double()  # [b, s]
        loss_sum += float(losses[mask].sum())
        n_tokens += int(mask.sum())
        batch.clear()

    for doc in documents:
        if max_documents is not None and n_docs >= max_documents:
            break
        n_docs += 1
        for seg in segments(doc, seq_length):
            batch.append(seg)
            if len(batch) == micro_batch_size:
                flush()
    flush()
    mean = loss_sum / n_tokens if n_tokens else float("nan")
    return PerplexityResult(
        name=name,
        path=path,
        documents=n_docs,
        tokens=n_tokens,
        loss_sum=loss_sum,
        mean_loss=mean,
        perplexity=math.exp(mean) if n_tokens else float("nan"),
    )
