"""The SLM GPT dataset: megatron-core's ``GPTDataset`` samples plus ``ref_loss``.

``SLMGPTDataset`` reuses ``GPTDataset`` unchanged (same cached document / sample / shuffle
indices, same ``tokens``/``labels``/``loss_mask``/``position_ids``) and adds

    ref_loss  # [s] float32: ref_loss[j] = sidecar value of the token labels[j], i.e. of that
              # token's position in its document; NaN for unscored tokens (first token of a
              # document), padding, the rolled-in last label without the extra token, the
              # batch-padding sample (idx None) and datasets without a sidecar.

The sidecar slice of a sample is found by re-walking ``GPTDataset._query_document_sample_shuffle
_indices`` (megatron-core 0.16) on the sidecar instead of the token dataset: same shuffle index,
same sample index bounds, same per-document offsets/lengths (``length=None`` for middle documents,
``end_offset + add_extra_token_to_sequence`` for the last), same right padding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split, get_blend_from_list

from megatron_slm.data.fim import FimSettings, FimTransform
from megatron_slm.data.index_file import check_token_dataset, num_sequences
from megatron_slm.data.sidecar import SidecarError, SidecarReader, sidecar_exists, sidecar_paths
from megatron_slm.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class SLMGPTDatasetConfig(GPTDatasetConfig):
    """``GPTDatasetConfig`` plus the sidecar policy."""

    require_sidecar: bool = False
    """Fail (naming the prefix) when a dataset of the blend has no reference-loss sidecar
    (selective training). Without it, such datasets give all-NaN ``ref_loss``."""

    fim: FimSettings | None = None
    """--fim-data: fill-in-the-middle samples (``data.fim``); their ``ref_loss`` is all NaN
    (the tokens moved) and the labels of the FIM pad token train nothing."""


def open_sidecar(
    dataset_path: str | None, indexed_dataset: IndexedDataset | None, require: bool
) -> SidecarReader | None:
    """Open and verify the sidecar of ``dataset_path``; ``None`` when absent and not required.

    A sidecar that exists but does not match its token dataset is always an error.
    """
    if dataset_path is None:
        if require:
            raise SidecarError("a reference-loss sidecar is required but the dataset is mock data")
        return None
    if not sidecar_exists(dataset_path):
        if require:
            bin_path, json_path = sidecar_paths(dataset_path)
            raise SidecarError(
                f"selective training needs a reference-loss sidecar for dataset prefix "
                f"{dataset_path!r}, but {json_path} / {bin_path} do not exist "
                "(score the corpus first: tools/score_corpus.py)"
            )
        return None
    lengths = None if indexed_dataset is None else indexed_dataset.sequence_lengths
    return SidecarReader(dataset_path, sequence_lengths=lengths)


class SLMGPTDataset(GPTDataset):
    """``GPTDataset`` whose samples also carry ``ref_loss`` (see the module docstring)."""

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: str | None,
        indexed_indices: np.ndarray,
        num_samples: int | None,
        index_split: Split,
        config: GPTDatasetConfig,
    ) -> None:
        # Only the training split ranks by reference losses: a validation or test blend of its
        # own (--valid-data-path) needs no sidecar.
        require = bool(getattr(config, "require_sidecar", False)) and index_split == Split.train
        # verified before the (possibly long) index build, so a mismatch fails fast
        self.sidecar = open_sidecar(dataset_path, indexed_dataset, require)
        fim = getattr(config, "fim", None)
        self.fim = None if fim is None else FimTransform(fim, config.tokenizer, config.random_seed)
        super().__init__(
            indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config
        )

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        sample["ref_loss"] = torch.from_numpy(self._ref_loss(idx))
        if self.fim is not None:
            sample["loss_mask"][sample["labels"] == self.fim.s.tokens.pad] = 0.0
        return sample

    def _query_document_sample_shuffle_indices(self, idx: int):
        text, documents = super()._query_document_sample_shuffle_indices(idx)
        if self.fim is not None:  # (rewritten by the sample's own index: any order, any worker)
            text = self.fim(text, idx)
        return text, documents

    def _ref_loss(self, idx: int | None) -> np.ndarray:
        """``[s]`` float32 reference loss of each label of sample ``idx``."""
        extra = int(self.config.add_extra_token_to_sequence)
        seq = self.config.sequence_length
        text_ref = np.full(seq + extra, np.nan, dtype=np.float32)  # aligned with megatron's text
        if idx is not None and self.sidecar is not None and self.fim is None:
            pos = 0
            for doc, offset, length in self._sample_spans(idx):
                part = self.sidecar.get_flat(doc, offset, length)
                text_ref[pos : pos + len(part)] = part
                pos += len(part)
        if extra:
            return text_ref[1:].copy()  # labels = text[1:]
        ref = np.full(seq, np.nan, dtype=np.float32)  # labels = roll(text, -1); labels[-1] = pad
        ref[:-1] = text_ref[1:]
        return ref

    def _sample_spans(self, idx: int) -> list[tuple[int, int, int]]:
        """``(document, offset, length)`` spans of sample ``idx``, exactly as megatron-core's
        ``_query_document_sample_shuffle_indices`` reads them (lengths resolved)."""
        extra = int(self.config.add_extra_token_to_sequence)
        lengths = self.dataset.sequence_lengths
        idx = self.shuffle_index[idx]
        beg, beg_offset = (int(x) for x in self.sample_index[idx])
        end, end_offset = (int(x) for x in self.sample_index[idx + 1])
        if beg == end:
            doc = int(self.document_index[beg])
            return [(doc, beg_offset, end_offset - beg_offset + extra)]
        spans = []
        for i in range(beg, end + 1):
            doc = int(self.document_index[i])
            offset = 0 if i > beg else beg_offset
            length = int(lengths[doc]) - offset if i < end else end_offset + extra
            spans.append((doc, offset, length))
        return spans


def parse_data_path(data_path: str | Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's ``--data-path``: ``["A"]``, ``["A", "B"]`` or ``["0.7", "A", "0.3", "B"]``
    (a single string is split on whitespace) -> ``(prefixes, weights or None)``."""
    if isinstance(data_path, str):
        data_path = data_path.split()
    blend = get_blend_from_list(list(data_path))
    if blend is None or not blend[0]:
        raise ConfigError("--data-path: no dataset prefix given")
    return blend


def check_data_path(
    data_path: str | Sequence[str], vocab_size: int | None, require_sidecar: bool
) -> None:
    """Every ``--data-path`` prefix: ``.bin``/``.idx`` present and consistent, token dtype fits
    the tokenizer, sidecar (when present or required) matches. Raises ``InputFileError`` /
    ``SidecarError`` naming the file; runs before megatron-core opens anything, so its asserts
    are never the message."""
    for prefix in parse_data_path(data_path)[0]:
        check_token_dataset(prefix, vocab_size)
        reader = open_sidecar(prefix, None, require_sidecar)
        logger.info(
            "data %s: %s",
            prefix,
            "no reference-loss sidecar" if reader is None else f"sidecar {reader.bin_path}",
        )


SPLIT_NAMES = ("training", "validation", "test")


def check_splits(prefixes: Sequence[str], split: str) -> None:
    """Each split that --split gives a share must hold a sequence of every dataset, as
    megatron-core cuts them (its share of the sequences, rounded): megatron-core would loop
    forever drawing samples from an empty split (its epochs add no tokens)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        n = num_sequences(prefix)
        for name, bound in zip(SPLIT_NAMES, bounds):
            if bound is not None and int(round(bound[1] * n)) <= int(round(bound[0] * n)):
                raise ConfigError(
                    f"--split {split}: the {name} split of {prefix} holds none of its {n} "
                    f"sequences (its share rounds to nothing): give it a larger share, or 0 for "
                    f"no {name} split"
                )


def build_gpt_datasets(
    data_path: str | Sequence[str] | None,
    split: str,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int | None],
    tokenizer,
    data_cache_path: str | None = None,
    require_sidecar: bool = False,
    *,
    add_extra_token_to_sequence: bool = True,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    drop_last_partial_validation_sequence: bool = True,
    mmap_bin_files: bool = True,
    num_dataset_builder_threads: int = 1,
    is_built_on_rank: Callable[[], bool] | None = None,
    blend_per_split: Sequence[Sequence[str] | None] | None = None,
    multiple_validation_sets: bool = False,
    full_validation: bool = False,
    mock: bool = False,
    fim: FimSettings | None = None,
) -> tuple:
    """Build (train, valid, test) ``SLMGPTDataset``s (or ``BlendedDataset``s of them) through
    megatron-core's ``BlendedMegatronDatasetBuilder``.

    Args:
        data_path: ``--data-path`` list, e.g. ``["0.7", "A", "0.3", "B"]`` or ``["A"]``.
        split: ``--split``, e.g. ``"969,30,1"``.
        blend_per_split: instead of ``data_path`` and ``split``, ``[train, valid, test]`` blends
            of their own (``--train-data-path`` ...; None: no such split), each dataset whole.
        multiple_validation_sets: with ``blend_per_split``, valid is a list, one dataset per
            validation prefix (megatron-core's; one prefix: the dataset itself).
        full_validation: valid's ``num_samples`` is None, one epoch (megatron-core checks it).
        seq_length: sequence length ``s`` of the samples.
        seed: dataset shuffling seed.
        num_samples: ``[train, valid, test]`` samples to draw (``None``: one epoch).
        tokenizer: from ``build_tokenizer`` (needs ``eod``, ``vocab_size``, ``unique_identifiers``).
        data_cache_path: where megatron-core caches the indices (default: next to the data).
        require_sidecar: every dataset the model trains on must have a valid sidecar
            (selective training).
        is_built_on_rank: megatron-core's callable (default: build on every rank).
        mock: megatron-core's ``MockGPTDataset`` instead of any data (``--mock-data``): no
            ``data_path``, ``split`` thirds, no sidecar.
        fim: --fim-data's settings (``data.fim``): every split's samples rewritten.
        num_dataset_builder_threads: megatron-core builds a blend's datasets in that many
            threads (the same samples).

    Sidecars of all prefixes are verified before any index is built.
    """
    num_samples = list(num_samples)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be [train, valid, test], got {num_samples}")
    blend, per_split = None, None
    if mock:
        split = None  # megatron-core's mock config: thirds
    elif blend_per_split is None:
        blend = parse_data_path(data_path)
        check_data_path(blend[0], tokenizer.vocab_size, require_sidecar)
        check_splits(blend[0], split)
    else:
        per_split = [None if not p else parse_data_path(p) for p in blend_per_split]
        for i, split_blend in enumerate(per_split):
            if split_blend is not None:
                check_data_path(split_blend[0], tokenizer.vocab_size, require_sidecar and i == 0)
        split = None  # megatron-core: every document of each split's datasets
    config = SLMGPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=per_split,
        split=split,
        path_to_cache=data_cache_path,
        mmap_bin_files=mmap_bin_files,
        num_dataset_builder_threads=num_dataset_builder_threads,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        drop_last_partial_validation_sequence=drop_last_partial_validation_sequence,
        add_extra_token_to_sequence=add_extra_token_to_sequence,
        require_sidecar=require_sidecar,
        multiple_validation_sets=multiple_validation_sets,
        full_validation=full_validation,
        fim=fim,
    )
    builder = BlendedMegatronDatasetBuilder(
        MockGPTDataset if mock else SLMGPTDataset,
        num_samples,
        is_built_on_rank or (lambda: True),
        config,
    )
    with _single_process_rank():
        train, valid, test = builder.build()
    return train, valid, test


@contextlib.contextmanager
def _single_process_rank():
    """megatron-core 0.16's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` without
    checking ``is_initialized()`` when it builds its cached indices, which fails in single-process
    runs (tools, tests, CPU quickstart). Without a process group this process *is* rank 0, so
    answer that for the duration of the build; with a process group nothing changes."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original
