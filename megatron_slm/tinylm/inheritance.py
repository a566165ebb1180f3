"""Parameter inheritance: initialise a smaller model from a larger trained one (RethinkTinyLM,
Minitron), on the shared runtime.

Three steps, each under the layout its entry point initialised (entry points own process groups):

1. :func:`prepare_inheritance` (no process group): plan the source (``runtime.plan_load``: a
   checkpoint or a Hugging Face directory, its description read once), build the target
   architecture, check everything (sizes, ``--layers``, calibration data). Bad input fails here,
   before any weight is read.
2. :func:`inherit_weights` (the source's TP/PP): load the source with ``runtime.load_model``, run
   the calibration rows with hooks (activation and block importance, the source's loss) or read
   weight magnitudes, choose the kept indices (:class:`InheritancePlan`), and slice every full
   (TP-gathered) source tensor into the target's. Returns the target's full state on every rank.
3. :func:`save_inherited` (TP=1, PP=1): build the target, measure the calibration loss of a random
   initialisation and of the inherited weights, and save a checkpoint that the trainer continues
   from (``--load SMALL --finetune``), with the inheritance in its metadata and a JSON report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from megatron_slm.checkpoint import CheckpointInfo, latest_iteration
from megatron_slm.errors import ConfigError, InputFileError
from megatron_slm.models.args import ModelArgs
from megatron_slm.models.presets import GPTModelConfig, check_parallel_layout
from megatron_slm.runtime.plan import LoadPlan, plan_load
from megatron_slm.tinylm.importance import (
    Importance,
    calibration_statistics,
    magnitude_importance,
    merge_over_ranks,
    random_importance,
)
from megatron_slm.tinylm.inheritance_config import InheritConfig
from megatron_slm.tinylm.inheritance_plan import (
    InheritancePlan,
    check_layers,
    check_source,
    check_target,
    chosen_layers,
    make_plan,
    prunes_width,
    target_architecture,
)
from megatron_slm.tinylm.inheritance_tensors import (
    check_plan_shapes,
    local_full_tensors,
    slice_tensor,
)

logger = logging.getLogger("megatron_slm")
REPORT_NAME = "inheritance_report.json"


@dataclass
class InheritanceRequest:
    cfg: InheritConfig
    info: CheckpointInfo
    source: GPTModelConfig
    target: GPTModelConfig
    seq_length: int  # calibration row length
    plan: LoadPlan  # the source, planned once (its metadata is not read again)

    @property
    def params_dtype(self) -> torch.dtype:
        return self.info.params_dtype or torch.float32

    @property
    def width_method(self) -> str | None:
        return self.cfg.width_importance if prunes_width(self.source, self.target) else None


def prepare_inheritance(cfg: InheritConfig) -> InheritanceRequest:
    """All checks that need no process group and no weights (errors name the flag)."""
    # The config's model flags describe the target: the source is the checkpoint's alone.
    impl = ModelArgs(transformer_impl=cfg.transformer_impl)
    plan = plan_load(cfg, model_args=impl, tokenizer="none")
    info = plan.checkpoint
    source = info.model
    check_source(source, cfg.load)
    target = target_architecture(source, cfg.model_args(), cfg.layer_choice)
    check_target(source, target)
    check_layers(cfg.layer_choice, source, target)
    check_parallel_layout(source, cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size)
    if prunes_width(source, target) and cfg.width_importance == "activation":
        if not cfg.calibration_data:
            raise ConfigError(
                "--width-importance activation needs --calibration-data (or use magnitude)"
            )
    if cfg.calibration_data:
        from megatron_slm.data.index_file import check_token_dataset

        check_token_dataset(cfg.calibration_data, source.vocab_size, flag="--calibration-data")
    if latest_iteration(cfg.save) is not None:
        raise ConfigError(f"--save {cfg.save} already holds a checkpoint: choose a new directory")
    if os.path.abspath(cfg.save) == os.path.abspath(cfg.load):
        raise ConfigError("--save must differ from --load")
    # The slicing rules on meta tensors of both shapes (any size, nothing allocated).
    layers = chosen_layers(
        cfg.layer_choice, source, target.num_layers, torch.zeros(source.num_layers)
    )
    check_plan_shapes(
        make_plan(source, target, layers, random_importance(source, 0)), info.padded_vocab_size
    )
    seq = cfg.calibration_seq_length or info.seq_length or 512
    seq = min(seq, source.max_position_embeddings)
    return InheritanceRequest(cfg, info, source, target, seq, plan)


# ---------------------------------------------------------------------------------------------
# calibration rows
# ---------------------------------------------------------------------------------------------
def calibration_rows(prefix: str, samples: int, seq_length: int, micro_batch: int, vocab: int):
    """Up to ``samples`` rows of ``seq_length`` next-token pairs cut from the documents of an
    indexed dataset in order (documents concatenated, as in pretraining), in micro-batches of one
    shape (the pipeline schedule needs it; a short last batch is dropped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_slm.runtime.forward import Rows

    dataset = IndexedDataset(prefix)
    need, parts, have = samples * (seq_length + 1), [], 0
    for i in range(len(dataset)):
        doc = np.asarray(dataset[i], dtype=np.int64)
        parts.append(doc)
        have += len(doc)
        if have >= need:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n_rows = min(samples, len(tokens) // (seq_length + 1))
    n_rows -= n_rows % micro_batch
    if n_rows == 0:
        raise InputFileError(
            f"--calibration-data {prefix}: {len(tokens)} tokens do not fill "
            f"{micro_batch} rows of {seq_length + 1} (lower --calibration-seq-length or "
            "--calibration-micro-batch-size)"
        )
    if int(tokens.max()) >= vocab:
        raise InputFileError(
            f"--calibration-data {prefix}: token id {int(tokens.max())} is outside the source's "
            f"vocabulary of {vocab}: tokenized with another tokenizer?"
        )
    rows = torch.from_numpy(tokens[: n_rows * (seq_length + 1)]).reshape(n_rows, seq_length + 1)
    return [
        Rows.causal(rows[i : i + micro_batch, :-1], rows[i : i + micro_batch, 1:])
        for i in range(0, n_rows, micro_batch)
    ]


# ---------------------------------------------------------------------------------------------
# step 2: importance, plan, slicing (source layout)
# ---------------------------------------------------------------------------------------------
@dataclass
class InheritedWeights:
    plan: InheritancePlan
    importance: Importance
    state: dict[str, torch.Tensor]  # the target's full (TP=1, PP=1) tensors, on CPU
    batches: list | None  # calibration rows (None without --calibration-data)


def _source_model(req: InheritanceRequest, device: torch.device):
    from megatron_slm.runtime import load_model

    return load_model(req.plan, device, params_dtype=req.params_dtype)


def inherit_weights(req: InheritanceRequest, device: torch.device) -> InheritedWeights:
    """Load the source for the initialised TP/PP, rank its parts, slice it (collective)."""
    cfg, src, tgt = req.cfg, req.source, req.target
    lm = _source_model(req, device)
    batches = None
    imp = Importance()
    method = req.width_method
    depth = cfg.layer_choice is not None and cfg.layer_choice.method == "importance"
    if cfg.calibration_data:
        batches = calibration_rows(
            cfg.calibration_data,
            cfg.calibration_samples,
            req.seq_length,
            cfg.calibration_micro_batch_size,
            src.vocab_size,
        )
        imp = calibration_statistics(lm, batches, width=method == "activation", depth=depth)
    if method in ("magnitude", "random"):
        width = (
            magnitude_importance(local_full_tensors(lm), src)
            if method == "magnitude"
            else random_importance(src, cfg.seed)
        )
        imp.hidden, imp.ffn, imp.heads = width.hidden, width.ffn, width.heads
    layers = chosen_layers(cfg.layer_choice, src, tgt.num_layers, imp.layers)
    plan = make_plan(src, tgt, layers, imp)
    state: dict[str, torch.Tensor] = {}
    for name, full in local_full_tensors(lm):
        out = slice_tensor(name, full, plan)
        if out is not None:
            state[out[0]] = out[1].cpu()
    del lm
    return InheritedWeights(plan, imp, merge_over_ranks(state), batches)


# ---------------------------------------------------------------------------------------------
# step 3: build, measure, save (TP=1, PP=1)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def load_state_into(chunk, state: dict[str, torch.Tensor]) -> None:
    """Copy the target's full tensors into a TP=1/PP=1 chunk; every parameter must be given."""
    params = dict(chunk.named_parameters())
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"inherited state does not fit the target: missing {missing}, extra {extra}"
        )
    for name, param in params.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(
                f"tensor {name}: inherited shape {list(state[name].shape)}, the target's "
                f"{list(param.shape)}"
            )
        param.copy_(state[name])


def _mean_loss(lm, batches) -> float:
    from megatron_slm.runtime import per_token_losses

    losses = per_token_losses(lm, batches)
    return float(torch.cat([x.flatten() for x in losses]).double().mean())


def save_inherited(
    req: InheritanceRequest, inherited: InheritedWeights, device: torch.device
) -> dict:
    """Build the target at TP=1/PP=1, measure, save; returns the report (written by rank 0)."""
    import torch.distributed as dist

    from megatron_slm.checkpoint import save_checkpoint
    from megatron_slm.models import ModelBuildOptions, build_model, default_spec_impl
    from megatron_slm.runtime import LoadedModel

    cfg, info = req.cfg, req.info
    opts = ModelBuildOptions(
        transformer_impl=cfg.transformer_impl or default_spec_impl(device),
        params_dtype=req.params_dtype,
        make_vocab_size_divisible_by=info.divisor_for(1),
        use_cpu_initialization=device.type == "cpu",
    )
    (chunk,) = build_model(req.target, opts, device)
    chunk.eval()
    lm = LoadedModel(
        [chunk], req.target, None, chunk.vocab_size, device, req.params_dtype, cfg.save
    )
    losses = {"source": inherited.importance.calibration_loss}
    if inherited.batches:
        losses["random_init"] = _mean_loss(lm, inherited.batches)
    load_state_into(chunk, inherited.state)
    if inherited.batches:
        losses["inherited"] = _mean_loss(lm, inherited.batches)
    report = build_report(req, inherited, losses, chunk.vocab_size)
    metadata = {
        "make_vocab_size_divisible_by": info.vocab_divisor,
        "params_dtype": str(req.params_dtype).removeprefix("torch."),
        "model_args": cfg.model_args().record(),
        "inheritance": {
            "source": info.path,
            "source_model": dataclasses.asdict(req.source),
            "layers_method": cfg.layer_choice.method if cfg.layer_choice else "all",
            "width_importance": req.width_method,
            "calibration": _calibration_record(req, inherited),
            "kept": inherited.plan.record(),
        },
    }
    if info.tokenizer:
        metadata["tokenizer"] = info.tokenizer
    if info.seq_length:
        metadata["seq_length"] = info.seq_length
    ckpt = save_checkpoint(cfg.save, 0, [chunk], model_config=req.target, metadata=metadata)
    report["checkpoint"] = ckpt
    if dist.get_rank() == 0:
        from megatron_slm.atomic_io import write_json_atomic

        write_json_atomic(cfg.report or os.path.join(cfg.save, REPORT_NAME), report)
    return report


def _calibration_record(req: InheritanceRequest, inherited: InheritedWeights) -> dict | None:
    if not inherited.batches:
        return None
    rows = sum(b.tokens.shape[0] for b in inherited.batches)
    return {
        "data": os.path.abspath(req.cfg.calibration_data),
        "rows": rows,
        "seq_length": req.seq_length,
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _summary(scores: torch.Tensor | None, kept: list[int]) -> dict:
    if scores is None:
        return {"kept": len(kept)}
    scores = scores.double()
    dropped = sorted(set(range(len(scores))) - set(kept))
    total = float(scores.sum())
    return {
        "kept": len(kept),
        "of": len(scores),
        "kept_share": float(scores[kept].sum()) / total if total else None,
        "min_kept": float(scores[kept].min()) if kept else None,
        "max_dropped": float(scores[dropped].max()) if dropped else None,
    }


def _per_layer(scores: dict[int, torch.Tensor], kept: dict[int, list[int]]) -> dict:
    per = {str(n): _summary(scores.get(n), kept[n]) for n in kept}
    shares = [v["kept_share"] for v in per.values() if v.get("kept_share") is not None]
    return {"mean_kept_share": sum(shares) / len(shares) if shares else None, "per_layer": per}


def build_report(req: InheritanceRequest, inherited: InheritedWeights, losses: dict, padded: int):
    plan, imp = inherited.plan, inherited.importance
    src_params = req.source.num_parameters(padded)
    tgt_params = req.target.num_parameters(padded)
    src_r = req.source.num_attention_heads // req.source.num_query_groups
    kept_heads = {  # global head index = group * heads per group + head inside the group
        n: [g * src_r + h for i, g in enumerate(plan.groups[n]) for h in plan.heads[n][i]]
        for n in plan.layers
    }
    return {
        "source": req.info.path,
        "source_model": dataclasses.asdict(req.source),
        "target_model": dataclasses.asdict(req.target),
        "parameters": {
            "source": src_params,
            "target": tgt_params,
            "ratio": tgt_params / src_params,
        },
        "layers": {
            "method": req.cfg.layer_choice.method if req.cfg.layer_choice else "all",
            "kept": plan.layers,
            "dropped": sorted(set(range(req.source.num_layers)) - set(plan.layers)),
            "block_importance": None if imp.layers is None else imp.layers.tolist(),
        },
        "width": {
            "method": req.width_method,
            "norm_scale": plan.norm_scale,
            "hidden": _summary(imp.hidden, plan.hidden),
            "ffn": _per_layer(imp.ffn, plan.ffn),
            "heads": _per_layer(imp.heads, kept_heads),
        },
        "calibration": {**(_calibration_record(req, inherited) or {}), "loss": losses},
    }


def format_report(report: dict) -> str:
    p, loss = report["parameters"], report["calibration"].get("loss", {})
    lines = [
        f"parameters: {p['source']:,} -> {p['target']:,} ({100 * p['ratio']:.1f}%)",
        f"layers ({report['layers']['method']}): kept {report['layers']['kept']}",
    ]
    width = report["width"]
    if width["method"]:
        lines.append(
            f"width ({width['method']}): hidden kept share {width['hidden'].get('kept_share')}, "
            f"ffn {width['ffn']['mean_kept_share']}, heads {width['heads']['mean_kept_share']}"
        )
    if loss.get("inherited") is not None:
        lines.append(
            f"calibration loss: source {loss.get('source'):.4f}, inherited "
            f"{loss['inherited']:.4f}, random init {loss['random_init']:.4f}"
        )
    lines.append(f"saved {report['checkpoint']}")
    return "\n".join(lines)
