"""Build a selection report: load the model (shared runtime), read documents and their reference
losses, select with the trainer's op, render HTML or PNG. Entry point: tools/visualize_selection.py
(which owns the process groups)."""

from __future__ import annotations

import os

import numpy as np
import torch

from megatron_slm.ops.selection import needs_reference
from megatron_slm.visualize.config import VisualizeConfig
from megatron_slm.visualize.selection import (
    DocumentSelection,
    SelectionSettings,
    VisualizeError,
    select_row,
    token_texts,
)


def open_documents(prefix: str, flag: str = "--data-path"):
    """The indexed dataset of ``prefix``, or a one-line error naming the flag."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        raise VisualizeError(f"{flag} {prefix}: {prefix}.bin / {prefix}.idx not found")
    return IndexedDataset(prefix)


def pick_documents(cfg: VisualizeConfig, n_docs: int) -> list[int]:
    if cfg.doc_list:
        bad = [d for d in cfg.doc_list if d >= n_docs]
        if bad:
            raise VisualizeError(
                f"--docs {bad[0]}: {cfg.data_path} has {n_docs} documents (indices 0..{n_docs - 1})"
            )
        return cfg.doc_list
    rng = np.random.default_rng(cfg.seed)
    k = min(cfg.sample, n_docs)
    return sorted(int(d) for d in rng.choice(n_docs, size=k, replace=False))


class ReferenceSource:
    """Reference losses of a document's labels: the sidecar's values, or the online model's."""

    def __init__(self, cfg: VisualizeConfig, lm, ds):
        from megatron_slm.data.sidecar import SidecarError, SidecarReader, sidecar_exists

        self.online = self.sidecar = None
        if cfg.slm_ref_load:
            from megatron_slm.runtime.reference import OnlineReference

            if lm.tokenizer is None:
                raise VisualizeError(f"--load {cfg.load}: no tokenizer recorded (needed for EOD)")
            from megatron_slm.runtime import LoadArgs, plan_load

            args = LoadArgs(load=cfg.slm_ref_load, device=cfg.device,
                            tensor_model_parallel_size=cfg.tensor_model_parallel_size)  # fmt: skip
            try:
                ref = plan_load(args, tokenizer="none", flag="--slm-ref-load")
                self.online = OnlineReference(ref, lm.device, lm.dtype, lm.tokenizer.eod)
            except ValueError as e:
                raise VisualizeError(str(e)) from None
            self.label = f"online reference {cfg.slm_ref_load}"
        elif sidecar_exists(cfg.data_path):
            try:
                self.sidecar = SidecarReader(cfg.data_path, np.array(ds.sequence_lengths))
            except SidecarError as e:
                raise VisualizeError(f"--data-path {e}") from None
            # The recorded identity is "path:iteration=..:meta-sha256=..": the path says enough.
            ref = (self.sidecar.reference or "unknown").split(":")[0]
            if os.path.isabs(ref) and not os.path.relpath(ref).startswith(".."):
                ref = os.path.relpath(ref)  # a shared report names no machine's paths
            self.label = f"sidecar {os.path.basename(cfg.data_path)}_refloss (model {ref})"
        elif needs_reference(cfg.slm_ratio, cfg.slm_select_mode):
            raise VisualizeError(
                f"--data-path {cfg.data_path}: no reference-loss sidecar "
                f"({cfg.data_path}_refloss.json) and no --slm-ref-load: excess loss needs a "
                "reference (score the corpus with tools/score_corpus.py, or pass --slm-ref-load)"
            )
        else:
            self.label = "none"

    def losses(self, doc: int, ids: np.ndarray) -> np.ndarray | None:
        """[len(ids) - 1] reference loss of ids[1:] (NaN: unscored), None without a reference."""
        if self.sidecar is not None:
            return self.sidecar.get(doc, 0, len(ids))[1:]
        if self.online is not None:
            t = torch.as_tensor(ids, dtype=torch.long)[None].to(self.online.model.device)
            return self.online.per_token_loss(t[:, :-1], t[:, 1:])[0].float().cpu().numpy()
        return None


def build_selections(cfg: VisualizeConfig, lm) -> tuple[list[DocumentSelection], str]:
    """The selection of every requested document, and a description of the reference."""
    ds = open_documents(cfg.data_path)
    docs = pick_documents(cfg, len(ds))
    ref_source = ReferenceSource(cfg, lm, ds)
    settings = SelectionSettings(cfg.slm_ratio, cfg.slm_select_mode, cfg.slm_unscored, cfg.seed)
    out = []
    for d in docs:
        full = np.asarray(ds.get(d), dtype=np.int64)
        ids = full[: cfg.max_tokens + 1]
        if ids.size < 2:
            raise VisualizeError(f"--docs {d}: document {d} has {ids.size} token (need 2)")
        if int(ids.max()) >= lm.padded_vocab_size:
            raise VisualizeError(
                f"--data-path {cfg.data_path}: document {d} has token id {int(ids.max())}, beyond "
                f"the model's {lm.padded_vocab_size} embedding rows"
            )
        ref = ref_source.losses(d, ids)
        loss, selected = select_row(lm, ids, ref, settings)
        texts = token_texts(lm.tokenizer, ids)
        out.append(
            DocumentSelection(
                doc=d,
                context=texts[0],
                tokens=texts[1:],
                loss=loss,
                ref=ref if ref is not None else np.full(loss.shape, np.nan, np.float32),
                selected=selected,
                truncated=full.size > ids.size,
                source=cfg.data_path,
            )
        )
    return out, ref_source.label


def visualize_selection(cfg: VisualizeConfig, plan, device: torch.device) -> dict:
    """Load ``plan`` (``runtime.plan_load(cfg)``, made before any process group), select,
    render; returns a summary (documents, output path). Writes on rank 0."""
    import torch.distributed as dist

    from megatron_slm.atomic_io import write_bytes_atomic
    from megatron_slm.runtime import load_model
    from megatron_slm.visualize.html import render_html
    from megatron_slm.visualize.png import render_png

    try:
        lm = load_model(plan, device)
    except ValueError as e:
        raise VisualizeError(str(e)) from None
    selections, ref_label = build_selections(cfg, lm)
    title = cfg.title or f"Token selection: {cfg.load} on {os.path.basename(cfg.data_path)}"
    subtitle = (
        f"ratio {cfg.slm_ratio}, mode {cfg.slm_select_mode}, unscored {cfg.slm_unscored}; "
        f"reference: {ref_label}"
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        if cfg.format == "html":
            data = render_html(selections, title, subtitle).encode("utf-8")
        else:
            data = render_png(selections, title=f"{title}\n{subtitle}")
        write_bytes_atomic(cfg.output, data)
    return {"documents": [s.doc for s in selections], "output": cfg.output,
            "stats": [s.stats for s in selections]}  # fmt: skip
