"""Build megatron-core GPT models for the current parallel layout.

Call after ``megatron.core.parallel_state.initialize_model_parallel``. ``build_model`` returns the
list of model chunks this rank owns (one, or one per virtual pipeline stage), each a real
``megatron.core.models.gpt.GPTModel`` with the embedding only on the first stage and the output
layer only on the last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_slm.errors import ConfigError
from megatron_slm.models.cross_entropy import install_language_model_loss
from megatron_slm.models.longrope import install_longrope, set_attention_factor
from megatron_slm.models.pipeline_layout import layout_virtual_size
from megatron_slm.models.presets import (
    GPTModelConfig,
    check_parallel_layout,
    padded_vocab_size,
    virtual_pipeline_size,
)
from megatron_slm.models.specs import (
    gpt_block_spec,
    mtp_block_spec,
    subclassed_mlp_warning_dropped,
)
from megatron_slm.models.yarn import install_yarn
from megatron_slm.platform import cpu_backend_enabled


def openai_gelu(x: torch.Tensor) -> torch.Tensor:
    """GeLU's tanh approximation (megatron-core's ``openai_gelu`` formula) in torch's one kernel;
    megatron-core's own is a ``torch.compile`` fusion, compiled at its first call."""
    return F.gelu(x, approximate="tanh")


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, as megatron-core's ``squared_relu`` (likewise a ``torch.compile`` fusion)."""
    return F.relu(x).square()


# The function of each activation of presets.ACTIVATIONS (SwiGLU: SiLU, gated).
ACTIVATION_FUNCS = {"swiglu": F.silu, "gelu": F.gelu, "openai_gelu": openai_gelu,
                    "squared_relu": squared_relu}  # fmt: skip


@dataclass(frozen=True)
class ModelBuildOptions:
    """How to instantiate the architecture (not what it is)."""

    transformer_impl: str = "torch"
    """--transformer-impl: te | local | torch (see megatron_slm.models.specs)."""
    params_dtype: torch.dtype = torch.float32
    """Parameter dtype: bf16/fp16 with --bf16/--fp16, else fp32."""
    sequence_parallel: bool = False
    """--sequence-parallel: shard norms/dropout activations along the sequence across TP."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """--num-layers-per-virtual-pipeline-stage: interleaved 1F1B."""
    virtual_stages: int | None = None
    """--num-virtual-stages-per-pipeline-rank: interleaved 1F1B, uneven stages too."""
    first_stage_layers: int | None = None
    """--decoder-first-pipeline-num-layers: an uneven pipeline split (None: even)."""
    last_stage_layers: int | None = None
    """--decoder-last-pipeline-num-layers."""
    pipeline_layout: str | None = None
    """--pipeline-model-parallel-layout: each (virtual) stage's layers, megatron-core's string
    (replaces the stage fields above and the virtual stage count)."""
    overlap_p2p_comm: bool = True
    """Interleaved schedule: the pipeline's sends and receives overlap other chunks' compute
    (Megatron-LM's default; off: --no-overlap-p2p-communication, then batched on GPU)."""
    microbatch_group_size_per_vp_stage: int | None = None
    """--microbatch-group-size-per-virtual-pipeline-stage (None: the pipeline size)."""
    make_vocab_size_divisible_by: int = 128
    """--make-vocab-size-divisible-by: vocabulary padding (times TP)."""
    use_cpu_initialization: bool = True
    """Initialise the full weights on CPU, then shard: identical models for any TP size."""
    calculate_per_token_loss: bool = True
    """Normalise gradients by the number of (selected) tokens across micro-batches and DP."""
    recompute: dict = field(default_factory=dict)
    """megatron-core's recompute fields (``TrainingArgs.recompute``); empty: none."""
    moe: dict = field(default_factory=dict)
    """megatron-core's mixture-of-experts training fields (``TrainingArgs.moe``: the auxiliary
    losses, the token dispatcher); empty: megatron-core's defaults (no auxiliary loss)."""
    attention_dropout: float = 0.0
    """--attention-dropout (training only)."""
    hidden_dropout: float = 0.0
    """--hidden-dropout (training only)."""
    attention_backend: str = "auto"
    """--attention-backend: megatron-core's AttnBackend name (Transformer Engine's kernel)."""
    apply_query_key_layer_scaling: bool = False
    """--apply-query-key-layer-scaling: megatron-core's fp16 guard in its own attention (Q.K^T
    over the layer number, multiplied back in the fp32 softmax); the same attention."""
    mtp_num_layers: int | None = None
    """--mtp-num-layers: multi-token prediction heads on the last stage (training builds only;
    the heads' weights are not read elsewhere)."""
    mtp_loss_scaling_factor: float = 0.1
    """--mtp-loss-scaling-factor: the heads' weight (training changes it per step under SLM)."""
    deterministic_mode: bool = False
    """--deterministic-mode: megatron-core's deterministic paths (its MoE token routing)."""
    xavier_uniform_init: bool = False
    """--init-method-xavier-uniform: new weights (linear layers, the embedding) drawn by torch's
    Xavier uniform, as Megatron-LM sets it; else the normal of the model's init_method_std."""


def _xavier_uniform_init() -> dict:
    """Megatron-LM's --init-method-xavier-uniform: its init and output-layer init methods (the
    embedding follows the init method, megatron-core's default when the stds agree)."""
    xavier = torch.nn.init.xavier_uniform_
    return {"init_method": xavier, "output_layer_init_method": xavier,
            "embedding_init_method": xavier}  # fmt: skip


def _router_without_te() -> None:
    """megatron-core's router GEMM reads ``moe_utils.te_general_gemm``, which its module defines
    only where Transformer Engine imports (0.16: a NameError in every MoE forward without it);
    None is the value its own check expects for "no TE GEMM" (then torch's matmul)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _moe_fields(model: GPTModelConfig, opts: ModelBuildOptions) -> dict:
    """megatron-core's fields of a mixture-of-experts model (none for a dense one). Experts are
    megatron-core's ``SequentialMLP`` (one MLP after another: no grouped GEMM, which needs
    Transformer Engine or the grouped_gemm package)."""
    if model.num_experts is None:
        return {}
    _router_without_te()
    training = dict(opts.moe)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1 and opts.calculate_per_token_loss:
        # megatron-core (0.16) weighs each TP rank's share of the auxiliary losses by that rank's
        # tokens, 1/TP of the sequence under sequence parallelism, where the per-token scaling
        # divides by all of them: their gradients would be 1/TP of TP 1's. Measured equal again
        # with the coefficients times TP (the logged values divide the coefficient back out).
        for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            if training.get(key):
                training[key] *= tp
    return {
        # (megatron-core's layers read it: an expert parameter is reduced over the expert
        # data-parallel group only with expert parallelism)
        "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size(),
        "num_moe_experts": model.num_experts,
        "moe_router_topk": model.moe_router_topk,
        "moe_ffn_hidden_size": model.expert_ffn_hidden_size,
        "moe_router_pre_softmax": model.moe_router_pre_softmax,
        "moe_layer_freq": list(model.moe_layer_freq) if model.moe_layer_freq else 1,
        "moe_shared_expert_intermediate_size": model.moe_shared_expert_intermediate_size,
        "moe_shared_expert_gate": model.moe_shared_expert_gate,
        "moe_router_score_function": model.moe_router_score_function,
        "moe_router_topk_scaling_factor": model.moe_router_topk_scaling_factor,
        "moe_router_num_groups": model.moe_router_num_groups,
        "moe_router_group_topk": model.moe_router_group_topk,
        "moe_router_enable_expert_bias": model.moe_router_enable_expert_bias,
        "moe_grouped_gemm": False,
        **training,
    }


def build_transformer_config(model: GPTModelConfig, opts: ModelBuildOptions) -> TransformerConfig:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    check_parallel_layout(
        model, tp, pp, opts.num_layers_per_virtual_pipeline_stage, opts.first_stage_layers,
        opts.last_stage_layers, opts.virtual_stages, etp, opts.pipeline_layout,
        opts.mtp_num_layers,
    )  # fmt: skip
    vpp = virtual_pipeline_size(
        model.num_layers, pp, opts.num_layers_per_virtual_pipeline_stage, opts.virtual_stages
    )
    if opts.pipeline_layout is not None:
        vpp = layout_virtual_size(opts.pipeline_layout, pp)
    if opts.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    overlap_p2p = opts.overlap_p2p_comm and vpp is not None
    config = TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.gated,
        activation_func=ACTIVATION_FUNCS[model.activation],
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_bias_linear or model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        layernorm_zero_centered_gamma=model.apply_layernorm_1p,
        window_size=None if model.window_size is None else (model.window_size, 0),
        **_moe_fields(model, opts),
        hidden_dropout=opts.hidden_dropout,
        attention_dropout=opts.attention_dropout,
        init_method_std=model.init_method_std,
        **_xavier_uniform_init() if opts.xavier_uniform_init else {},
        # Fusions that need Apex/TE kernels are off; TE's spec fuses on its own.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_tensor_parallel_size=etp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=opts.first_stage_layers,
        num_layers_in_last_pipeline_stage=opts.last_stage_layers,
        pipeline_model_parallel_layout=opts.pipeline_layout,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=opts.params_dtype,
        pipeline_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        fp16=opts.params_dtype == torch.float16,
        use_cpu_initialization=opts.use_cpu_initialization,
        calculate_per_token_loss=opts.calculate_per_token_loss,
        # Megatron-LM's: overlapped (hence unbatched) sends and receives in the interleaved
        # schedule, batched ones otherwise. gloo matches point-to-point messages between two
        # ranks in posting order; megatron's batched p2p posts (send_prev, recv_prev, send_next,
        # recv_next), which with PP=2 pairs a gradient with an activation buffer. The unbatched
        # path orders even/odd ranks correctly.
        overlap_p2p_comm=overlap_p2p,
        batch_p2p_comm=not overlap_p2p and not cpu_backend_enabled(),
        microbatch_group_size_per_vp_stage=opts.microbatch_group_size_per_vp_stage,
        attention_backend=AttnBackend[opts.attention_backend],
        apply_query_key_layer_scaling=opts.apply_query_key_layer_scaling,
        deterministic_mode=opts.deterministic_mode,
        mtp_num_layers=opts.mtp_num_layers,
        mtp_loss_scaling_factor=opts.mtp_loss_scaling_factor,
        **opts.recompute,
    )
    scaled = model.longrope or model.yarn
    if scaled is not None:
        set_attention_factor(config, scaled.attention_factor)
    return config


def build_gpt_chunk(
    model: GPTModelConfig,
    config: TransformerConfig,
    opts: ModelBuildOptions,
    *,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
) -> GPTModel:
    """One GPTModel chunk (the layers of one (virtual) pipeline stage); the last stage computes
    its loss without host syncs (``models.cross_entropy``)."""
    vocab = padded_vocab_size(
        model.vocab_size, opts.make_vocab_size_divisible_by, config.tensor_model_parallel_size
    )
    block = gpt_block_spec(opts.transformer_impl, config, vp_stage=vp_stage)
    with subclassed_mlp_warning_dropped():  # the torch spec's FusedSwiGLUMLP
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=block,
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=model.tied_embeddings,
            position_embedding_type=model.position_embedding_type,
            rotary_base=int(model.rotary_base),
            rotary_percent=model.rotary_percent,
            rope_scaling=model.rope_scaling_factor is not None,
            rope_scaling_factor=model.rope_scaling_factor or 8.0,
            seq_len_interpolation_factor=model.rope_interpolation_factor,
            vp_stage=vp_stage,
            # --mtp-num-layers: the heads, on the last stage
            mtp_block_spec=mtp_block_spec(opts.transformer_impl, config, block, vp_stage)
            if post_process and opts.mtp_num_layers
            else None,
        )
    if model.longrope is not None:
        install_longrope(chunk, model)
    if model.yarn is not None:
        install_yarn(chunk, model)
    if post_process:
        install_language_model_loss(chunk)
    return chunk


def build_model(
    model: GPTModelConfig, opts: ModelBuildOptions, device: torch.device | None = None
) -> list[GPTModel]:
    """The model chunks of this rank for the initialised parallel layout."""
    config = build_transformer_config(model, opts)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        chunk = build_gpt_chunk(
            model,
            config,
            opts,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            vp_stage=vp_stage,
        )
        if device is not None:
            chunk.to(device)
        chunks.append(chunk)
    return chunks
