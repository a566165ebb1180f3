"""Hugging Face Llama / Mistral <-> megatron-core GPT checkpoints; GPT-3's architecture -> GPT-2.

Llama and Mistral are megatron_slm's Llama architecture (RMSNorm, SwiGLU, RoPE rotate-half,
grouped-query attention, no biases; the output layer tied to the embedding or not, as
``tie_word_embeddings`` says), so conversion is a renaming plus two layout changes:

* ``linear_qkv`` is group-interleaved: for each key/value group ``g`` the rows are
  ``[q heads of g (heads/groups x head_dim), k_g (head_dim), v_g (head_dim)]``; HF keeps
  ``q_proj`` / ``k_proj`` / ``v_proj`` separate, heads in order. Because the groups are contiguous,
  a TP shard of ``linear_qkv`` is a contiguous row block of the full tensor.
* ``linear_fc1`` is ``[gate; up]``; a TP shard holds ``[gate_r; up_r]`` (not a contiguous block).

Both use the non-interleaved RoPE (``rotate_half``), the same inverse frequencies and softmax scale,
so no head permutation is needed (checked by the parity tests against ``transformers``).

Vocabulary: megatron pads the embedding and output layer to a multiple of
``--make-vocab-size-divisible-by`` x TP; the padding rows are zero after import and dropped on
export.

Export picks its target from the checkpoint's architecture (:func:`export_architecture`): Llama's
(tied, as Llama 3.2 1B's, or not) exports as ``LlamaForCausalLM`` / ``MistralForCausalLM``, with
QKV biases as ``Qwen2ForCausalLM``, with QK norm as ``Qwen3ForCausalLM``;
GPT-3's (LayerNorm, an ungated GeLU, tanh-GeLU or squared-ReLU MLP, learned positions,
multi-head attention; with or without biases, tied or untied) as ``GPT2LMHeadModel``
(``convert.hf_gpt2`` has its layout); any other mix of the two is refused, naming what each
Hugging Face architecture lacks. Nemotron's (LayerNorm 1p, squared ReLU, RoPE on part of each
head, no biases) exports as ``NemotronForCausalLM``. Import reads all six (GPT-2:
``runtime.hf_gpt2_source``).

Import (:func:`convert_hf_to_megatron`) runs either in one process (any target TP/PP: the
distributed checkpoint is layout-free, only the padded vocabulary depends on the target TP and is
computed for it) or under ``torchrun`` with TP x PP processes (each rank fills its own shards).
Export (:func:`convert_megatron_to_hf`) runs in one process: megatron-core reshards the checkpoint
to TP=1/PP=1 on load, so every tensor is whole.

This module holds the two drivers and the export's choice of target; the pieces are one job
each: ``runtime.hf_source`` (HF -> megatron: config, lazy weights, tensors; also what ``--load
HF_DIR`` uses), ``convert.hf_target`` (megatron -> Llama/Mistral: dtypes, config, tensors),
``convert.hf_gpt2`` (megatron -> GPT-2: config, tensors), ``convert.hf_files`` (safetensors
shards, the tokenizer) and ``convert.tokenizer_export`` (a SentencePiece model as a HF fast
tokenizer).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from megatron_slm.convert.hf_files import (
    check_tokenizer_vocab,
    copy_tokenizer,
    export_tokenizer,
    tokenizer_vocab_size,
    write_hf_weights,
)
from megatron_slm.convert.hf_gpt2 import (
    GPT2_ARCHITECTURE,
    gpt2_config_from_gpt,
    gpt2_mismatches,
    gpt2_tensors_from_megatron,
)
from megatron_slm.convert.hf_target import (
    FAMILIES,
    architecture_mismatches,
    dtype_name,
    family_mismatches,
    family_of,
    hf_config_from_gpt,
    hf_tensors_from_megatron,
    parse_dtype,
)
from megatron_slm.convert.tokenizer_export import write_generation_config
from megatron_slm.data.tokenizer import model_digest
from megatron_slm.models.presets import GPTModelConfig, padded_vocab_size
from megatron_slm.models.sharding import full_state_dict
from megatron_slm.runtime.hf_moe import GLM4_MOE, MIXTRAL, glm_names, mixtral_names
from megatron_slm.runtime.hf_phi3 import PHI3_ARCHITECTURE, fuse_phi3
from megatron_slm.runtime.hf_source import (
    ConversionError,
    architecture,
    check_hf_weights,
    gpt_config_from_hf,
    hf_tied,
    load_hf_into_chunks,
    open_hf_weights,
    read_hf_config,
    tokenizer_files,
)

logger = logging.getLogger("megatron_slm")


# ---------------------------------------------------------------------------------------------
# the two directions
# ---------------------------------------------------------------------------------------------
@dataclass
class ImportResult:
    checkpoint: str
    model: GPTModelConfig
    padded_vocab_size: int


def import_layout(tensor_model_parallel_size: int, pipeline_model_parallel_size: int):
    """The (TP, PP) an import builds its model at: (1, 1) in a world of one process, else the
    target layout itself (one process per shard)."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    world = world_size()
    if world == 1:
        return 1, 1
    if world == tp * pp:
        return tp, pp
    raise ConversionError(
        f"conversion runs in 1 process or in --tensor-model-parallel-size x "
        f"--pipeline-model-parallel-size = {tp * pp} processes, not {world}"
    )


def world_size() -> int:
    import torch.distributed as dist

    from megatron_slm.launch import process_info

    return dist.get_world_size() if dist.is_initialized() else process_info().world_size


def convert_hf_to_megatron(
    load: str,
    save: str,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    make_vocab_size_divisible_by: int = 128,
    params_dtype: str | torch.dtype = torch.float32,
    iteration: int = 0,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> ImportResult:
    """HF model directory -> megatron_slm checkpoint at ``save`` for the target TP/PP.

    In a world of one process the model is built at TP=1/PP=1 with the target's padded
    vocabulary; in a world of TP x PP processes (torchrun) at the target layout itself. The caller
    (the entry point) initialises that layout: :func:`import_layout`.

    A non-empty ``save`` is refused unless ``overwrite``; the checkpoint is written beside it and
    replaces it only once complete (``checkpoint.publish_output_dir``). A tokenizer that is
    Python code the directory ships is read, and copied with its code, only with
    ``trust_remote_code``.
    """
    import torch.distributed as dist

    from megatron_slm.checkpoint import (
        check_new_output_dir,
        discard_staging_dir,
        publish_output_dir,
        save_checkpoint,
        staging_dir,
    )

    check_new_output_dir(save, overwrite)
    from megatron_slm.models import ModelBuildOptions, build_model

    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    load = os.path.abspath(load)
    hf_cfg = read_hf_config(load)
    where = os.path.join(load, "config.json")
    model = gpt_config_from_hf(hf_cfg, where)
    tied = hf_tied(hf_cfg)
    weights = open_hf_weights(load, hf_cfg, model)
    check_hf_weights(model, weights, tied)
    padded = padded_vocab_size(model.vocab_size, make_vocab_size_divisible_by, tp)
    tok_files = tokenizer_files(load)
    n_tokens = tokenizer_vocab_size(load, trust_remote_code) if tok_files else None
    if n_tokens is not None:
        check_tokenizer_vocab(load, n_tokens, model, padded)
    else:
        logger.warning("%s: no tokenizer files; the checkpoint records no tokenizer", load)
    from megatron_slm.models import check_parallel_layout

    check_parallel_layout(model, tp, pp)

    build_tp, build_pp = import_layout(tp, pp)
    divisible = padded if build_tp == 1 else make_vocab_size_divisible_by
    from megatron.core import parallel_state

    if (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    ) != (build_tp, build_pp):
        raise ConversionError(
            f"initialise the parallel state with TP={build_tp}, PP={build_pp} first "
            "(megatron_slm.convert.hf.import_layout)"
        )
    dtype = parse_dtype(params_dtype)
    opts = ModelBuildOptions(
        transformer_impl="torch", params_dtype=dtype, make_vocab_size_divisible_by=divisible
    )
    chunks = build_model(model, opts)
    load_hf_into_chunks(chunks, weights, model, tied)

    save = os.path.abspath(save)
    staged = staging_dir(save)
    tok_dir = os.path.join(save, "tokenizer")  # where it will be once published
    if tok_files and dist.get_rank() == 0:
        copy_tokenizer(load, os.path.join(staged, "tokenizer"))
    metadata = {
        "source": f"hf:{load}",
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "params_dtype": dtype_name(dtype),
        # The layout the padded vocabulary was computed for (built at TP=1 in a world of one).
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "hf": {"architecture": architecture(hf_cfg), "config": hf_cfg},
    }
    if tok_files:
        if dist.get_world_size() > 1:
            dist.barrier()  # rank 0's copy is complete before any rank hashes it
        metadata["tokenizer"] = {
            "type": "HuggingFaceTokenizer",
            "model": tok_dir,
            "vocab_size": n_tokens,
            # the copy's digest: every later load and export checks the files against it
            "sha256": model_digest("HuggingFaceTokenizer", os.path.join(staged, "tokenizer")),
        }
    try:
        staged_ckpt = save_checkpoint(
            staged, iteration, chunks, model_config=model, metadata=metadata
        )
        publish_output_dir(staged, save)
    except BaseException:
        discard_staging_dir(staged)
        raise
    ckpt = os.path.join(save, os.path.basename(staged_ckpt))
    logger.info("converted %s -> %s (padded vocabulary %d)", load, ckpt, padded)
    return ImportResult(ckpt, model, padded)


def export_architecture(
    model: GPTModelConfig, requested: str | None = None, imported: str | None = None
) -> str:
    """The Hugging Face architecture ``model`` exports as: ``requested`` (``--architecture``) if
    it fits the model's architecture, else the one it was ``imported`` from, else the first that
    fits (Llama's design: LlamaForCausalLM or MistralForCausalLM, with QKV biases
    Qwen2ForCausalLM, with QK norm Qwen3ForCausalLM; their mixtures of experts MixtralForCausalLM,
    Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, with a sigmoid router and an expert bias
    Glm4MoeForCausalLM; GPT-3's: GPT2LMHeadModel). A model none
    represents, or a request that does not fit, is refused naming what the architectures need."""
    needs = {**family_mismatches(model), GPT2_ARCHITECTURE: gpt2_mismatches(model)}
    fitting = [
        arch for family, gaps in needs.items() if not gaps
        for arch in (FAMILIES[family][0] if family in FAMILIES else (family,))
        if family not in FAMILIES or not architecture_mismatches(model, arch)
    ]  # fmt: skip
    choices = model.describe_kind()
    if not fitting:
        lacking = "; ".join(f"{family} needs {', '.join(gaps)}" for family, gaps in needs.items())
        raise ConversionError(
            "Hugging Face's Llama, Qwen, Phi-3, Mixtral, Qwen-MoE, GLM-4.5, Nemotron and GPT-2 "
            "cannot represent this "
            f"checkpoint's {choices}: {lacking}"
        )
    if requested is not None and requested not in fitting:
        family = GPT2_ARCHITECTURE if requested == GPT2_ARCHITECTURE else family_of(requested)
        if family is None:
            raise ConversionError(
                f"--architecture {requested!r} is not supported; this checkpoint's {choices} "
                f"exports as {' or '.join(fitting)}"
            )
        if family == GPT2_ARCHITECTURE:
            gaps = needs[family]
        else:  # (its family's needs and its own: Llama's is the window)
            gaps = architecture_mismatches(model, requested)
        raise ConversionError(
            f"--architecture {requested}: this checkpoint's {choices} exports as "
            f"{' or '.join(fitting)}; {family} needs {', '.join(gaps)}"
        )
    if requested is not None:
        return requested
    return imported if imported in fitting else fitting[0]


def convert_megatron_to_hf(
    load: str,
    save: str,
    *,
    architecture_name: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    tokenizer_model: str | None = None,
    chat_template: str | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> str:
    """megatron_slm checkpoint -> HF directory (config.json, generation_config.json, safetensors,
    a fast tokenizer with a chat template; see :func:`export_tokenizer`): Llama/Mistral, or GPT-2
    for GPT-3's architecture (:func:`export_architecture`).

    A non-empty ``save`` is refused unless ``overwrite``; the files are written beside it and the
    directory replaces ``save`` only once complete, so no stale shard of an earlier export stays.
    A Hugging Face tokenizer that is code is exported only with ``trust_remote_code``.

    Runs in one process: the checkpoint is loaded at TP=1/PP=1 (megatron-core reshards).
    """
    from megatron.core import parallel_state

    from megatron_slm.checkpoint import (
        check_new_output_dir,
        checkpoint_tensor_info,
        discard_staging_dir,
        publish_output_dir,
        staging_dir,
    )
    from megatron_slm.runtime import LoadArgs, load_model, plan_load

    if world_size() != 1:
        raise ConversionError("megatron-to-hf runs in a single process (no torchrun)")
    check_new_output_dir(save, overwrite)
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ConversionError("megatron-to-hf loads the checkpoint at TP=1/PP=1")
    plan = plan_load(LoadArgs(load=load, device="cpu"), tokenizer="none")
    if plan.is_hf:
        raise ConversionError(f"--load {load}: already a Hugging Face model directory")
    info = plan.checkpoint
    ckpt, meta, model = info.path, info.meta, info.model
    tensor_info = checkpoint_tensor_info(ckpt)
    ckpt_dtype = next(iter(tensor_info.values()))[1] if tensor_info else torch.float32
    out_dtype = parse_dtype(dtype) if dtype is not None else ckpt_dtype
    hf_meta = meta.get("hf") or {}
    arch = export_architecture(model, architecture_name, hf_meta.get("architecture"))
    if arch == GPT2_ARCHITECTURE:
        hf_cfg = gpt2_config_from_gpt(model, out_dtype, hf_meta.get("config"))
        to_hf = gpt2_tensors_from_megatron
    elif arch in (PHI3_ARCHITECTURE, MIXTRAL, GLM4_MOE):  # Llama's tensors, two projections
        hf_cfg = hf_config_from_gpt(model, arch, out_dtype, hf_meta.get("config"))  # fused; or
        rename = {PHI3_ARCHITECTURE: fuse_phi3, MIXTRAL: mixtral_names, GLM4_MOE: glm_names}[arch]

        def to_hf(state, model):
            return rename(hf_tensors_from_megatron(state, model))
    else:
        hf_cfg = hf_config_from_gpt(model, arch, out_dtype, hf_meta.get("config"))
        to_hf = hf_tensors_from_megatron
    staged = staging_dir(save)
    try:  # the tokenizer first: one it refuses costs no load of the model
        ids = export_tokenizer(info, staged, tokenizer_model, chat_template, trust_remote_code)
        if ids is not None:  # the exported tokenizer's special ids win over the defaults
            hf_cfg.update({k: v for k, v in ids.items() if k != "pad_token_id" or v is not None})
        lm = load_model(plan, torch.device("cpu"), params_dtype=ckpt_dtype)
        state = full_state_dict(lm.chunks[0])
        tensors = ((k, v.to(out_dtype)) for k, v in to_hf(state, model))
        files = write_hf_weights(tensors, staged, max_shard_size)
        with open(os.path.join(staged, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        write_generation_config(
            staged,
            hf_cfg.get("bos_token_id"),
            hf_cfg.get("eos_token_id"),
            hf_cfg.get("pad_token_id"),
        )
        publish_output_dir(staged, save)
    except BaseException:
        discard_staging_dir(staged)
        raise
    logger.info("exported %s -> %s (%s)", ckpt, save, ", ".join(files))
    return save
