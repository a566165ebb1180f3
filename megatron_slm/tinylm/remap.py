"""Carry a checkpoint over to a pruned tokenizer: embedding and output-layer rows by the id map.

Row ``n`` of the new word embedding and output layer is row ``new_to_old[n]`` of the old ones;
padding rows (Megatron-LM pads the vocabulary to a multiple of the divisor x TP, recomputed for the
new size) are zero, like an imported checkpoint's. Every other tensor is copied unchanged. So the
new model's logit for a new id equals the old model's logit for the mapped old id on the same
input ids (the softmax differs: it spans fewer ids).

Runs at the initialised TP/PP layout (the caller, an entry point, sets it up): the old checkpoint
is loaded through ``runtime.load_model`` (megatron-core reshards it to this layout), each rank
gathers its vocabulary-parallel rows across TP, selects and re-shards them (``models.sharding``),
and the new checkpoint is saved at this layout. Its metadata keeps the old one's facts, with the
new vocabulary, padding and tokenizer record.
"""

from __future__ import annotations

import logging
import os

import torch

from megatron_slm.checkpoint import (
    check_new_output_dir,
    discard_staging_dir,
    publish_output_dir,
    save_checkpoint,
    staging_dir,
)
from megatron_slm.models.presets import padded_vocab_size
from megatron_slm.models.sharding import global_name, tp_shard, unwrap
from megatron_slm.runtime import LoadPlan, load_model
from megatron_slm.tinylm.idmap import IdMap, IdMapError, check_fits_checkpoint

logger = logging.getLogger("megatron_slm")

VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Metadata of the old checkpoint that does not describe the new one (save_checkpoint writes the
# layout, architecture and bookkeeping afresh; the trainer's config names the old tokenizer).
_DROPPED_KEYS = (
    "format_version", "iteration", "consumed_samples", "model", "tokenizer", "padded_vocab_size",
    "world_size", "tensor_model_parallel_size", "pipeline_model_parallel_size", "config",
)  # fmt: skip


def new_tokenizer_record(idmap: IdMap, tokenizer_model: str | None, flag: str) -> dict:
    """The new tokenizer's record; the model file must exist and be the one the map was made for."""
    from megatron_slm.data.tokenizer import SentencePieceTokenizer

    record = dict(idmap.new_tokenizer)
    path = tokenizer_model or record.get("model")
    if not path or not os.path.isfile(path):
        raise IdMapError(
            f"{flag} {idmap.path}: the new tokenizer model {path} is missing (moved? pass "
            "--tokenizer-model)"
        )
    tok = SentencePieceTokenizer(path)
    if tok.vocab_size != idmap.new_size or (
        record.get("sha256") and tok.unique_identifiers["sha256"] != record["sha256"]
    ):
        raise IdMapError(
            f"--tokenizer-model {path}: not the tokenizer {idmap.path} was made for "
            f"({tok.vocab_size} ids, sha256 {tok.unique_identifiers['sha256']}; the map records "
            f"{idmap.new_size} ids, sha256 {record.get('sha256')})"
        )
    record["model"] = os.path.abspath(path)
    return record


def _gather_rows(param: torch.Tensor) -> torch.Tensor:
    """The full ``[padded, h]`` tensor of a vocabulary-parallel parameter (all TP ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(tp)]
    dist.all_gather(
        parts, param.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    return torch.cat(parts, dim=param.partition_dim)


@torch.no_grad()
def remap_chunks(old_chunks, new_chunks, new_to_old: torch.Tensor, old_vocab: int) -> None:
    """Fill ``new_chunks`` (built for the new vocabulary at this layout) from ``old_chunks``."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for old, new in zip(map(unwrap, old_chunks), map(unwrap, new_chunks)):
        old_params = dict(old.named_parameters())
        for local, param in new.named_parameters():
            src = old_params[local]
            name = global_name(new, local)
            if name in VOCAB_TENSORS:
                full_old = _gather_rows(src)[:old_vocab]
                padded = param.shape[0] * (tp if getattr(param, "tensor_model_parallel", 0) else 1)
                full = torch.zeros((padded,) + tuple(full_old.shape[1:]), dtype=param.dtype)
                full[: len(new_to_old)] = full_old[new_to_old.to(full_old.device)].cpu()
                param.copy_(tp_shard(name, full, param, tp, rank))
            else:
                if src.shape != param.shape:
                    raise ValueError(f"tensor {name}: {list(src.shape)} vs {list(param.shape)}")
                param.copy_(src)


def remap_checkpoint(
    plan: LoadPlan,
    idmap: IdMap,
    save: str,
    device: torch.device,
    *,
    tokenizer_model: str | None = None,
    make_vocab_size_divisible_by: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``save``: the planned checkpoint (``runtime.plan_load``) for the pruned tokenizer of
    ``idmap``. A non-empty ``save`` is refused unless ``overwrite``; the checkpoint is written
    beside it and replaces it only once complete (``checkpoint.publish_output_dir``).

    Needs the parallel state initialised (any TP/PP); returns the new iteration directory."""
    from megatron.core import parallel_state

    from megatron_slm.models import ModelBuildOptions, build_model, default_spec_impl

    check_new_output_dir(save, overwrite)
    info = plan.checkpoint
    check_fits_checkpoint(idmap, info)
    record = new_tokenizer_record(idmap, tokenizer_model, "--id-map")
    old = load_model(plan, device, params_dtype=info.params_dtype or torch.float32)
    arch = old.arch.replace(vocab_size=idmap.new_size)
    divisor = make_vocab_size_divisible_by or info.vocab_divisor
    tp = parallel_state.get_tensor_model_parallel_world_size()
    opts = ModelBuildOptions(
        transformer_impl=default_spec_impl(device),
        params_dtype=old.dtype,
        make_vocab_size_divisible_by=divisor,
        use_cpu_initialization=device.type == "cpu",
    )
    new_chunks = build_model(arch, opts, device)
    remap_chunks(old.chunks, new_chunks, torch.tensor(idmap.new_to_old), old.vocab_size)
    meta = {k: v for k, v in info.meta.items() if k not in _DROPPED_KEYS}
    seq_length = info.seq_length
    meta.update(
        tokenizer=record,
        make_vocab_size_divisible_by=divisor,
        params_dtype=str(old.dtype).removeprefix("torch."),
        source=f"remap:{os.path.abspath(info.path)}",
        remap={
            "from": os.path.abspath(info.path),
            "id_map": idmap.path,
            "old_tokenizer": info.tokenizer or idmap.old_tokenizer,
            "old_vocab_size": old.vocab_size,
            "old_padded_vocab_size": old.padded_vocab_size,
        },
    )
    if seq_length:
        meta["seq_length"] = seq_length
    staged = staging_dir(save)
    try:
        staged_out = save_checkpoint(staged, 0, new_chunks, model_config=arch, metadata=meta)
        publish_output_dir(staged, save)
    except BaseException:
        discard_staging_dir(staged)
        raise
    out = os.path.join(os.path.abspath(save), os.path.basename(staged_out))
    logger.info(
        "remapped %s -> %s: vocabulary %d -> %d (padded %d -> %d at TP=%d)",
        info.path,
        out,
        old.vocab_size,
        idmap.new_size,
        old.padded_vocab_size,
        padded_vocab_size(idmap.new_size, divisor, tp),
        tp,
    )
    return out
