"""Run token-loss dynamics on real checkpoints (tools/token_dynamics.py): per-token losses of the
same tokens at every checkpoint (shared runtime, the training convention: padded vocabulary),
categories, the selected/unselected split, the JSON summary and the PNG."""

from __future__ import annotations

import numpy as np
import torch

from megatron_slm.visualize.config import DynamicsConfig
from megatron_slm.visualize.dynamics import (
    CATEGORIES,
    category_summary,
    checkpoint_step,
    default_threshold,
    plot_dynamics,
)
from megatron_slm.visualize.selection import SelectionSettings, VisualizeError, select_row


def _rows(cfg: DynamicsConfig) -> list[tuple[int, np.ndarray]]:
    from megatron_slm.visualize.report import open_documents

    ds = open_documents(cfg.data_path)
    rows = []
    for d in range(len(ds)):
        ids = np.asarray(ds.get(d, 0, min(int(ds.sequence_lengths[d]), cfg.max_tokens + 1)))
        if ids.size >= 2:
            rows.append((d, ids.astype(np.int64)))
        if len(rows) == cfg.num_docs:
            break
    if not rows:
        raise VisualizeError(f"--data-path {cfg.data_path}: no document with 2 or more tokens")
    return rows


def _load(path: str, flag: str, device):
    from megatron_slm.runtime import LoadArgs, load_model, plan_load

    try:
        return load_model(plan_load(LoadArgs(load=path), tokenizer="none", flag=flag), device)
    except ValueError as e:
        raise VisualizeError(str(e)) from None


def _check_ids(lm, rows, path):
    top = max(int(ids.max()) for _, ids in rows)
    if top >= lm.padded_vocab_size:
        raise VisualizeError(f"--checkpoints {path}: token id {top} beyond its "
                             f"{lm.padded_vocab_size} embedding rows")  # fmt: skip


@torch.no_grad()
def _losses(lm, rows) -> np.ndarray:
    from megatron_slm.runtime import per_token_losses
    from megatron_slm.runtime.forward import Rows

    out = []
    for _, ids in rows:
        t = torch.as_tensor(ids)[None]
        (loss,) = per_token_losses(lm, [Rows.causal(t[:, :-1], t[:, 1:])])
        out.append(loss[0].float().cpu().numpy())
    return np.concatenate(out)


def _selection(cfg: DynamicsConfig, rows, device) -> tuple[np.ndarray, str] | None:
    from megatron_slm.data.sidecar import SidecarError, SidecarReader, sidecar_exists

    if not sidecar_exists(cfg.data_path):
        if cfg.select_checkpoint:
            raise VisualizeError(
                f"--select-checkpoint needs the reference-loss sidecar of --data-path "
                f"{cfg.data_path} ({cfg.data_path}_refloss.json not found)"
            )
        return None
    try:
        sidecar = SidecarReader(cfg.data_path)
    except SidecarError as e:
        raise VisualizeError(f"--data-path {e}") from None
    path = cfg.select_checkpoint or cfg.checkpoints[0]
    lm = _load(path, "--select-checkpoint", device)
    _check_ids(lm, rows, path)
    settings = SelectionSettings(ratio=cfg.slm_ratio)
    masks = [select_row(lm, ids, sidecar.get(d, 0, ids.size)[1:], settings)[1] for d, ids in rows]
    return np.concatenate(masks), path


def token_dynamics(cfg: DynamicsConfig, device: torch.device, log=print) -> dict:
    """Compute and write ``<output>.json`` and ``<output>.png``; returns the summary."""
    from megatron_slm.atomic_io import write_bytes_atomic, write_json_atomic
    from megatron_slm.progress import ProgressBar

    rows = _rows(cfg)
    n_tokens = sum(ids.size - 1 for _, ids in rows)
    bar = ProgressBar("token dynamics", len(cfg.checkpoints), "checkpoints")
    curves, steps = [], []
    for i, path in enumerate(cfg.checkpoints):
        lm = _load(path, "--checkpoints", device)
        _check_ids(lm, rows, path)
        curves.append(_losses(lm, rows))
        steps.append(checkpoint_step(path.rstrip("/"), i))
        bar.update(i + 1, final=i + 1 == len(cfg.checkpoints))
    losses = np.stack(curves)  # [checkpoints, tokens]
    theta = cfg.threshold if cfg.threshold is not None else default_threshold(losses)
    summary = category_summary(losses, theta)
    sel = _selection(cfg, rows, device)
    split = None
    if sel is not None:
        mask, sel_path = sel
        split = {
            "checkpoint": sel_path,
            "ratio": cfg.slm_ratio,
            "selected": category_summary(losses, theta, mask),
            "unselected": category_summary(losses, theta, ~mask),
        }
    result = {
        "checkpoints": list(cfg.checkpoints),
        "steps": steps,
        "documents": len(rows),
        "tokens": n_tokens,
        "threshold": theta,
        "categories": summary,
        "selection": split,
    }
    write_json_atomic(cfg.output + ".json", result)
    png = plot_dynamics(steps, summary, split, cfg.width, cfg.height)
    write_bytes_atomic(cfg.output + ".png", png)
    log(f"{n_tokens} tokens of {len(rows)} documents, {len(steps)} checkpoints, "
        f"threshold {theta:.3f} nats (high: loss > threshold)")  # fmt: skip
    header = "category  share" + ("   selected  unselected" if split else "")
    log(header)
    for cat in CATEGORIES:
        line = f"{cat:8s}  {summary[cat]['share'] * 100:5.1f}%"
        if split:
            line += (f"   {split['selected'][cat]['share'] * 100:7.1f}%"
                     f"  {split['unselected'][cat]['share'] * 100:9.1f}%")  # fmt: skip
        log(line)
    log(f"wrote {cfg.output}.json and {cfg.output}.png ({cfg.width}x{cfg.height})")
    return result
