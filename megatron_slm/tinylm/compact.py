"""The compact-tokenizer steps as functions of their configs (``tools/compact_tokenizer.py`` is a
thin CLI over these). ``remap`` needs the parallel state initialised by the caller."""

from __future__ import annotations

import os

import torch

from megatron_slm.errors import ConfigError, InputFileError
from megatron_slm.tinylm.compact_config import CountConfig, PruneConfig, RemapConfig


def count(cfg: CountConfig, progress: bool = True) -> tuple[dict, dict | None, str | None]:
    """Count ids, then (SentencePiece BPE/unigram models) the coverage curve: writes the counts,
    ``<counts>.coverage.json`` and ``<counts>.coverage.png``. Returns (counts metadata, curve,
    why there is no curve)."""
    from megatron_slm.checkpoint import resolve_tokenizer, tokenizer_record
    from megatron_slm.tinylm.counts import count_corpus

    tok, ttype, model = resolve_tokenizer(cfg, None)  # the trainer's rules for the flags
    record = tokenizer_record(ttype, model, tok)
    proto, skipped = _curve_model(cfg, ttype)  # checked before the corpus is read
    heldout = _heldout_texts(cfg) if cfg.heldout else None
    meta = count_corpus(cfg.data_path, record, cfg.output, workers=cfg.workers, progress=progress)
    if proto is None:
        return meta, None, skipped
    return meta, _write_curve(cfg, proto, heldout), None


def _curve_model(cfg: CountConfig, ttype: str):
    """(the model proto, None), or (None, why the tokenizer has no coverage curve)."""
    from megatron_slm.tinylm import spm
    from megatron_slm.tinylm.compact_config import PRUNABLE_TOKENIZERS
    from megatron_slm.tinylm.coverage import size_range

    if ttype not in PRUNABLE_TOKENIZERS:
        return None, f"no coverage curve: a {ttype} cannot be pruned"
    proto = spm.load_model_proto(cfg.tokenizer_model)
    kind = spm.model_type(proto)
    if kind not in spm.PRUNABLE_MODEL_TYPES:
        return None, f"no coverage curve: a SentencePiece {kind} model cannot be pruned"
    lo, hi = size_range(proto)
    bad = [n for n in cfg.curve_sizes if not lo <= n <= hi]
    if bad:
        raise ConfigError(
            f"--curve-sizes {bad[0]}: a pruned {cfg.tokenizer_model} has {lo}..{hi} pieces "
            f"({lo} are always kept)"
        )
    return proto, None


def _write_curve(cfg: CountConfig, proto, heldout: list[str] | None) -> dict:
    import numpy as np

    from megatron_slm.atomic_io import write_bytes_atomic, write_json_atomic
    from megatron_slm.tinylm.coverage import (
        TABLE_SIZES,
        coverage_curve,
        curve_paths,
        curve_png,
        default_sizes,
    )

    counts = np.load(cfg.output, allow_pickle=False)
    sizes = cfg.curve_sizes or default_sizes(proto, TABLE_SIZES)
    curve = coverage_curve(proto, counts, sizes, list(cfg.curve_coverages), heldout)
    json_path, png_path = curve_paths(cfg.output)
    curve["files"] = {"json": os.path.abspath(json_path), "png": os.path.abspath(png_path)}
    title = f"{os.path.basename(cfg.tokenizer_model)}: coverage of {curve['counted_tokens']:,.0f} "
    title += "counted tokens by pruned size"
    write_bytes_atomic(png_path, curve_png(curve, title))
    write_json_atomic(json_path, curve)
    return curve


def _heldout_texts(cfg: CountConfig | PruneConfig) -> list[str]:
    from megatron_slm.data.jsonl import iter_jsonl
    from megatron_slm.data.preprocess import expand_inputs

    texts = []
    for path in expand_inputs(cfg.heldout):
        for line_no, record in iter_jsonl(path):
            if cfg.heldout_json_key not in record:
                raise InputFileError(
                    f"--heldout {path}:{line_no}: no {cfg.heldout_json_key!r} field"
                )
            texts.append(record[cfg.heldout_json_key])
            if len(texts) >= cfg.heldout_max_docs:
                return texts
    return texts


def prune(cfg: PruneConfig) -> dict:
    """Write the pruned model, its id map and report; returns the report."""
    from megatron_slm.atomic_io import write_json_atomic
    from megatron_slm.checkpoint import tokenizer_record
    from megatron_slm.data.tokenizer import SentencePieceTokenizer
    from megatron_slm.tinylm import spm
    from megatron_slm.tinylm.counts import check_counts_tokenizer, load_counts
    from megatron_slm.tinylm.idmap import IdMap, idmap_path_for, write_idmap
    from megatron_slm.tinylm.prune import Ranking, prune_model, write_model
    from megatron_slm.tinylm.report import prune_report

    proto = spm.load_model_proto(cfg.tokenizer_model)
    spm.check_prunable(proto, cfg.tokenizer_model)
    old_tok = SentencePieceTokenizer(cfg.tokenizer_model)
    counts, meta = load_counts(cfg.counts)
    check_counts_tokenizer(
        counts,
        meta,
        len(proto.pieces),
        old_tok.unique_identifiers["sha256"],
        cfg.tokenizer_model,
        f"--counts {cfg.counts}",
    )
    heldout = _heldout_texts(cfg) if cfg.heldout else None
    ranking = Ranking(proto, counts)
    size = cfg.vocab_size or ranking.smallest_size(cfg.coverage, "--coverage")
    result = prune_model(proto, counts, size, ranking)
    write_model(result.proto, cfg.output)
    new_tok = SentencePieceTokenizer(cfg.output)
    idmap = IdMap(
        new_to_old=result.selection.kept,
        old_tokenizer=tokenizer_record(cfg.tokenizer_type, cfg.tokenizer_model, old_tok),
        new_tokenizer=tokenizer_record(cfg.tokenizer_type, cfg.output, new_tok),
    )
    write_idmap(idmap, cfg.id_map or idmap_path_for(cfg.output))
    report = prune_report(
        proto_old=proto,
        proto_new=result.proto,
        selection=result.selection,
        unreachable_kept=result.unreachable_kept,
        counts=counts,
        heldout=heldout,
        hidden_size=cfg.hidden_size,
        divisible_by=cfg.make_vocab_size_divisible_by,
    )
    report["coverage_target"] = cfg.coverage  # None: --vocab-size chose N
    report["files"] = {
        "model": os.path.abspath(cfg.output),
        "id_map": os.path.abspath(cfg.id_map or idmap_path_for(cfg.output)),
        "counts": os.path.abspath(cfg.counts),
        "original": os.path.abspath(cfg.tokenizer_model),
    }
    write_json_atomic(cfg.report or report_path_for(cfg.output), report)
    return report


def report_path_for(model_path: str) -> str:
    base = model_path[:-6] if model_path.endswith(".model") else model_path
    return base + ".report.json"


def remap(cfg: RemapConfig, plan, device: torch.device) -> str:
    """``plan``: ``runtime.plan_load(cfg, tokenizer="none")``, made before any process group."""
    from megatron_slm.tinylm.idmap import read_idmap
    from megatron_slm.tinylm.remap import remap_checkpoint

    idmap = read_idmap(cfg.id_map)
    return remap_checkpoint(
        plan,
        idmap,
        cfg.save,
        device,
        tokenizer_model=cfg.tokenizer_model,
        make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by,
        overwrite=cfg.overwrite,
    )
