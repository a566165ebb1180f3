"""Merge token datasets into one, with their reference-loss sidecars (the library behind
tools/merge_datasets.py).

Megatron-LM's ``tools/merge_datasets.py`` concatenates the ``.bin``/``.idx`` pairs of a directory
(megatron-core's ``IndexedDatasetBuilder.add_index``); a corpus preprocessed and scored in shards
also has one sidecar per shard, whose values follow its tokens one for one. Here the tokens are
merged the same way (sequences and documents in input order, published as a pair like
preprocessing's output: ``indexed.publish_pair``), then, when every input has a sidecar, the
sidecars' stored values are copied in the same order into the merged dataset's sidecar (written
by ``SidecarWriter``: fingerprinted against the merged tokens, its metadata published last).

Inputs must agree on what a merged file can only hold once: the token dtype, and for sidecars
the value dtype, the reference model and the scoring settings; a mix of inputs with and without
sidecars is refused (score the others, or merge the tokens alone with ``--no-sidecars``). The run
holds ``<output_prefix>.lock`` and repairs what a killed run left first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from megatron_slm.cli import arg
from megatron_slm.data.index_file import read_index
from megatron_slm.data.indexed import DocumentBuilder, recover_pair
from megatron_slm.data.sidecar import SidecarReader, SidecarWriter, sidecar_exists
from megatron_slm.errors import ConfigError, InputFileError
from megatron_slm.output_lock import OutputLock
from megatron_slm.progress import ProgressBar

logger = logging.getLogger("megatron_slm")


@dataclass
class MergeConfig:
    """Settings of tools/merge_datasets.py (Megatron-LM's flags, and the sidecars')."""

    input: str | None = arg(
        None, "Directory of the datasets to merge: every <name>.idx/.bin in it, by name order."
    )
    input_prefixes: list[str] = arg(
        [], "Or the dataset prefixes to merge, in this order.", nargs="+"
    )
    output_prefix: str = arg(None, "The merged dataset: <prefix>.bin/.idx.", required=True)
    no_sidecars: bool = arg(
        False, "Merge the tokens alone, leaving the inputs' reference-loss sidecars out."
    )
    no_progress: bool = arg(False, "No progress line.")

    def __post_init__(self):
        if (self.input is None) == (not self.input_prefixes):
            raise ConfigError("give either --input DIR or --input-prefixes P ..., not both")

    @property
    def prefixes(self) -> list[str]:
        return prefixes_in(self.input) if self.input else list(self.input_prefixes)

    def run(self) -> MergeResult:
        sidecars = False if self.no_sidecars else None
        return merge_datasets(self.prefixes, self.output_prefix, sidecars, not self.no_progress)


@dataclass
class MergeResult:
    prefix: str
    num_sequences: int
    num_tokens: int
    sidecar: bool  # whether the merged dataset got a sidecar


def prefixes_in(directory: str) -> list[str]:
    """Megatron-LM's ``--input`` directory: every ``<name>.idx`` in it, sorted by name (its
    ``.bin`` must be beside it)."""
    if not os.path.isdir(directory):
        raise ConfigError(f"--input {directory}: not a directory")
    prefixes = [
        os.path.join(directory, name[: -len(".idx")])
        for name in sorted(os.listdir(directory))
        if name.endswith(".idx")
    ]
    if not prefixes:
        raise ConfigError(f"--input {directory}: no .idx file (no tokenized dataset) in it")
    return prefixes


def merge_datasets(
    prefixes: list[str], output_prefix: str, sidecars: bool | None = None, progress: bool = True
) -> MergeResult:
    """Merge the datasets ``prefixes`` (in this order) into ``output_prefix``. ``sidecars``:
    None merges them when every input has one (refusing a mix), True requires them, False
    merges the tokens alone. Every input is checked before anything is written."""
    if not prefixes:
        raise ConfigError("give the datasets to merge (--input DIR or --input-prefixes P ...)")
    output = os.path.abspath(output_prefix)
    if output in {os.path.abspath(p) for p in prefixes}:
        raise ConfigError(f"--output-prefix {output_prefix} is one of the inputs")
    facts = [read_index(p, flag="--input") for p in prefixes]
    for f in facts[1:]:
        if f.dtype != facts[0].dtype:
            raise InputFileError(
                f"{f.prefix}.idx stores {f.dtype} token ids, {facts[0].prefix}.idx "
                f"{facts[0].dtype}: merge datasets tokenized with the same vocabulary"
            )
    readers = _sidecar_readers(prefixes, sidecars)
    total = sum(f.num_tokens for f in facts)
    # tokens copied, then as many sidecar values
    bar = ProgressBar("merge", total * (2 if readers else 1), "values", enabled=progress)

    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with OutputLock(output + ".lock", f"--output-prefix {output_prefix}"):
        repaired = recover_pair(output)
        if repaired:
            logger.warning("%s: a killed run's leftovers: %s", output, repaired)
        builder = DocumentBuilder(output, facts[0].dtype.type)
        try:
            done = 0
            for f in facts:
                builder.add_index(f.prefix)  # megatron-core's: the index, then the bytes
                done += f.num_tokens
                bar.update(done)
            builder.finalize()
        except BaseException:
            builder.abort()
            raise
        if readers:
            _merge_sidecars(output, readers, bar, done)
        bar.update(bar.total, final=True)
    n_sequences = sum(len(f.sequence_lengths) for f in facts)
    logger.info(
        "merged %d datasets into %s: %d sequences, %d tokens%s", len(prefixes), output_prefix,
        n_sequences, total, ", with their sidecars" if readers else "",
    )  # fmt: skip
    return MergeResult(output_prefix, n_sequences, total, bool(readers))


def _sidecar_readers(prefixes: list[str], wanted: bool | None) -> list[SidecarReader]:
    """Each input's sidecar, opened (and so checked against its tokens), when they are merged."""
    if wanted is False:
        return []
    missing = [p for p in prefixes if not sidecar_exists(p)]
    if missing and (wanted or len(missing) < len(prefixes)):
        raise InputFileError(
            f"{missing[0]} has no reference-loss sidecar"
            + (f" (nor {len(missing) - 1} more inputs)" if len(missing) > 1 else "")
            + ": score it (tools/score_corpus.py), or merge the tokens alone with --no-sidecars"
        )
    if missing:
        return []
    readers = [SidecarReader(p) for p in prefixes]
    first = readers[0]
    for r in readers[1:]:
        for what, mine, theirs in (("value dtype", r.dtype, first.dtype),
                                   ("reference model", r.reference, first.reference),
                                   ("scoring settings", r.settings, first.settings)):  # fmt: skip
            if mine != theirs:
                raise InputFileError(
                    f"the sidecars of {first.data_prefix} and {r.data_prefix} differ in their "
                    f"{what} ({theirs!r} vs {mine!r}): a merged sidecar records one; merge "
                    "sidecars of one scoring run, or the tokens alone with --no-sidecars"
                )
    return readers


def _merge_sidecars(output: str, readers: list[SidecarReader], bar, done: int) -> None:
    """The readers' stored values, in order, as the sidecar of the merged tokens at ``output``."""
    first = readers[0]
    writer = SidecarWriter(
        output, dtype=first.dtype, reference=first.reference, settings=first.settings,
        overwrite=True,
    )  # fmt: skip
    try:
        doc = 0
        for r in readers:
            writer.copy_documents(doc, r)
            doc, done = doc + r.num_documents, done + r.num_tokens
            bar.update(done)
        writer.finalize()
    finally:
        writer.close()
