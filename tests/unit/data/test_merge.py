"""tools/merge_datasets.py: merging shards gives, byte for byte, the dataset and the sidecar that
preprocessing and scoring the whole corpus at once write (documents, empty ones included, and
values in shard order); inputs that cannot merge are refused before anything is written."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_slm.data.gpt_dataset import check_data_path
from megatron_slm.data.indexed import DocumentBuilder
from megatron_slm.data.merge import MergeConfig, merge_datasets
from megatron_slm.data.sidecar import SidecarReader, SidecarWriter, sidecar_exists, sidecar_paths
from megatron_slm.errors import ConfigError, InputFileError
from tests.functional.pretrain_helpers import run_tool

SETTINGS = {"tool": "tools/score_corpus.py", "seq_length": 64}


def _shard(rng, n_docs):
    """(tokens, lengths, values): documents of 0 to 30 tokens (empty ones have no sequence) and
    each token's reference loss (NaN at every document's first token)."""
    lengths = rng.integers(0, 30, n_docs)
    lengths[1] = 0
    tokens = rng.integers(0, 1000, int(lengths.sum())).astype(np.uint16)
    values = [np.r_[np.nan, rng.random(n - 1) * 8].astype(np.float32) for n in lengths if n]
    return tokens, lengths, values


def _write(prefix, tokens, lengths, values, reference="ref", dtype="float16"):
    builder = DocumentBuilder(prefix, np.uint16)
    builder.add_documents(tokens, lengths)
    builder.finalize()
    if values is not None:
        writer = SidecarWriter(prefix, dtype=dtype, reference=reference, settings=SETTINGS)
        writer.write_range(0, values)
        writer.finalize()
        writer.close()
    return prefix


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    parts = [_shard(rng, n) for n in (7, 12, 5)]
    os.makedirs(tmp_path / "shards")
    prefixes = [_write(str(tmp_path / "shards" / f"part{i}"), *p) for i, p in enumerate(parts)]
    whole = [np.concatenate([p[k] for p in parts]) for k in (0, 1)]
    everything = _write(str(tmp_path / "whole"), *whole, [v for p in parts for v in p[2]])
    return prefixes, everything


def _same_files(a: str, b: str) -> None:
    for suffix in (".bin", ".idx"):
        with open(a + suffix, "rb") as x, open(b + suffix, "rb") as y:
            assert x.read() == y.read(), suffix


def _same_sidecars(a: str, b: str) -> None:
    """The same values, and the same metadata but the dataset's name."""
    (a_bin, a_json), (b_bin, b_json) = sidecar_paths(a), sidecar_paths(b)
    with open(a_bin, "rb") as x, open(b_bin, "rb") as y:
        assert x.read() == y.read()
    metas = [json.loads(open(path).read()) for path in (a_json, b_json)]
    for meta in metas:
        del meta["token_dataset"]["name"]
    assert metas[0] == metas[1]


def test_merged_shards_are_the_whole_corpus_with_its_sidecar(shards, tmp_path):
    prefixes, whole = shards
    out = str(tmp_path / "merged" / "corpus_text_document")
    result = merge_datasets(prefixes, out, progress=False)
    assert result.sidecar and result.num_tokens == sum(
        int(SidecarReader(p).num_tokens) for p in prefixes
    )
    _same_files(out, whole)  # tokens and index, empty documents' boundaries included
    _same_sidecars(out, whole)  # the same fingerprint too: the tokens are the same bytes
    merged = SidecarReader(out)  # fingerprinted against the merged tokens
    assert (merged.reference, merged.settings, merged.dtype) == ("ref", SETTINGS, "float16")
    check_data_path(out, 1000, require_sidecar=True)  # what the trainer checks first
    # In small chunks (each recorded as a range): the same bytes
    again = str(tmp_path / "again")
    _write(again, *(np.fromfile(whole + ".bin", np.uint16), _lengths(whole)), None)
    writer = SidecarWriter(again, reference="ref", settings=SETTINGS)
    first = 0
    for p in prefixes:
        writer.copy_documents(first, SidecarReader(p), chunk_tokens=7)
        first += len(SidecarReader(p))
    writer.finalize()
    writer.close()
    _same_sidecars(again, whole)


def _lengths(prefix):
    """Per-document lengths (0 for empty documents) of a dataset written by ``_write``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    seq = data.sequence_lengths.tolist()
    bounds = data.document_indices.tolist()
    return np.array([seq[a] if b > a else 0 for a, b in zip(bounds, bounds[1:])])


def test_tokens_alone_and_the_input_directory(shards, tmp_path):
    prefixes, whole = shards
    out = str(tmp_path / "tokens_only")
    cfg = MergeConfig(input=os.path.dirname(prefixes[0]), output_prefix=out, no_sidecars=True,
                      no_progress=True)  # fmt: skip
    assert cfg.prefixes == prefixes  # every .idx of the directory, by name
    result = cfg.run()
    assert not result.sidecar and not sidecar_exists(out)
    _same_files(out, whole)


def test_inputs_that_cannot_merge_are_refused_before_writing(shards, tmp_path):
    prefixes, _ = shards
    rng = np.random.default_rng(1)
    out = str(tmp_path / "out")
    unscored = _write(str(tmp_path / "unscored"), *_shard(rng, 4)[:2], None)
    other_ref = _write(str(tmp_path / "other_ref"), *_shard(rng, 4), reference="another")
    wide = str(tmp_path / "wide")
    builder = DocumentBuilder(wide, np.int32)
    builder.add_documents(np.arange(5), np.array([5]))
    builder.finalize()
    cases = [
        ([*prefixes, unscored], "unscored has no reference-loss sidecar: score it"),
        ([prefixes[0], other_ref], "differ in their reference model ('ref' vs 'another')"),
        ([prefixes[0], wide], "wide.idx stores int32 token ids"),
        ([prefixes[0], out], None),
    ]
    for inputs, message in cases:
        if message is None:  # the output among the inputs
            with pytest.raises(ConfigError, match="is one of the inputs"):
                merge_datasets(inputs, out, progress=False)
            continue
        with pytest.raises(InputFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            merge_datasets(inputs, out, progress=False)
        assert not os.path.exists(out + ".bin") and not os.path.exists(out + ".idx")
    with pytest.raises(InputFileError, match="no reference-loss sidecar"):
        merge_datasets([unscored], out, sidecars=True, progress=False)
    assert not merge_datasets([*prefixes, unscored], out, sidecars=False, progress=False).sidecar
    with pytest.raises(ConfigError, match="not both"):
        MergeConfig(input="d", input_prefixes=["p"], output_prefix=out)


def test_the_tool(shards, tmp_path):
    prefixes, whole = shards
    out = str(tmp_path / "cli")
    proc = run_tool("merge_datasets", "--input", os.path.dirname(prefixes[0]), "--output-prefix",
                    out)  # fmt: skip
    assert proc.stdout.strip().endswith("tokens and its reference-loss sidecar")
    _same_files(out, whole)
    proc = run_tool("merge_datasets", "--input", tmp_path / "none", "--output-prefix", out,
                    status=2)  # fmt: skip
    assert (
        proc.stderr.strip().splitlines()[-1].endswith(f"--input {tmp_path}/none: not a directory")
    )
