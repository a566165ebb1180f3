"""All layer specs of the project, in one place.

Three implementations of the same decoder layer, Llama's (RMSNorm, SwiGLU, RoPE, GQA, no biases)
or GPT-3's (LayerNorm, GeLU, biases; its learned positions and tied embeddings live in the
``GPTModel`` around the layers), with Qwen's norms on each head's query and key when asked, as
the ``TransformerConfig`` says:

* ``te``    Transformer Engine modules (fused norm+linear, flash/cuDNN attention); GPU only.
* ``local`` megatron-core's own modules (``DotProductAttention``, ``WrappedTorchNorm``; Apex's fused
            kernels where megatron-core picks them up).
* ``torch`` megatron-core's tensor-parallel linears with core attention on
            ``torch.nn.functional.scaled_dot_product_attention`` (causal without a mask: flash
            attention on GPU; in eval mode without SDPA's cuDNN backend, whose per-shape graph
            builds the scorer's varying widths would pay) and ``torch.nn.RMSNorm``
            (``F.rms_norm``: torch's fused kernel where it has one) or ``torch.nn.LayerNorm``
            that support sequence parallelism, the fused SwiGLU (``FusedSwiGLUMLP``) and the
            fused RoPE (``FusedRoPESelfAttention``). The default on CPU, and on GPU without
            Transformer Engine.

All three keep megatron-core's parameter names and ``sharded_state_dict_keys_map``, so checkpoints
move freely between them.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch.torch_version import TorchVersion

from megatron_slm.errors import ConfigError
from megatron_slm.models.document_mask import DocumentMask, document_attention_backend
from megatron_slm.ops.rope import apply_rope
from megatron_slm.ops.swiglu import swiglu

SPEC_IMPLS = ("te", "local", "torch")

# SDPA takes grouped key/value heads itself from torch 2.5 (its flash kernel reads them unexpanded).
_SDPA_HAS_GQA = TorchVersion(torch.__version__) >= "2.5"


class TorchRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron-core's norm constructor and sequence-parallel support.

    With sequence parallelism the norm sees a sequence shard, so its weight gradient is partial;
    the ``sequence_parallel`` attribute makes megatron-core all-reduce it across the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
        self.zero_centered = _zero_centered(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered:
            return super().forward(x)
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


class TorchLayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with megatron-core's norm constructor and sequence-parallel support
    (its weight and bias gradients are partial under sequence parallelism, as RMSNorm's)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
        self.bias.sequence_parallel = config.sequence_parallel
        self.zero_centered = _zero_centered(self, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered:
            return super().forward(x)
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


def _zero_centered(norm, config: TransformerConfig) -> bool:
    """--apply-layernorm-1p (megatron-core's ``layernorm_zero_centered_gamma``): the weight is
    stored as ``gamma - 1``, so it starts at 0 (Transformer Engine's norms' convention)."""
    if not config.layernorm_zero_centered_gamma:
        return False
    with torch.no_grad():
        norm.weight.zero_()
    return True


def torch_norm(config: TransformerConfig) -> type:
    """The torch spec's norm for ``config.normalization``."""
    return TorchLayerNorm if config.normalization == "LayerNorm" else TorchRMSNorm


class TorchSDPAttention(MegatronModule):
    """Core attention on ``scaled_dot_product_attention`` (drop-in for ``DotProductAttention``).

    ``attention_mask`` follows megatron-core: bool, ``True`` = masked out, broadcastable to
    ``[b, np, sq, sk]``. With no mask the attention is causal (``attn_mask_type``); a given mask is
    used as is (the scorer passes block-diagonal causal masks for packed documents). A
    :class:`~megatron_slm.models.document_mask.DocumentMask` (packed documents of the online
    reference and the scorer) runs on FlexAttention's block mask where that is the faster path
    (CUDA, forward only), else as its dense mask.

    With ``config.window_size`` (``(left, 0)``: sliding-window attention) query ``i`` of ``sq``
    sees key ``j`` of ``sk`` only when ``i + (sk - sq) - left <= j``, megatron-core's band (its
    queries are the last ``sq`` positions: a KV-cache step too), and the band is intersected with
    any given mask (packed documents keep their boundaries). Where no key lies beyond the window
    (``sk <= left + 1``) the band masks nothing and is not built, so flash attention stays
    available.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ConfigError("the torch spec does not support --context-parallel-size > 1")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.softmax_scale = softmax_scale
        self.window = config.window_size

    def _outside_window(self, sq: int, sk: int, device) -> torch.Tensor | None:
        """``[sq, sk]`` bool, True where the sliding window masks a key (None: no window, or
        nothing beyond it)."""
        if self.window is None or sk <= self.window[0] + 1:
            return None
        left, right = self.window
        i = torch.arange(sq, device=device)[:, None] + (sk - sq)  # each query's position
        j = torch.arange(sk, device=device)[None, :]
        return (j < i - left) | (j > i + right)

    def forward(
        self,
        query: torch.Tensor,  # [sq, b, np, hn]
        key: torch.Tensor,  # [sk, b, ng, hn]
        value: torch.Tensor,  # [sk, b, ng, hn]
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError(
                "the torch spec takes packed sequences as a block-diagonal attention_mask, "
                "not packed_seq_params"
            )
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by the torch spec")
        sq, b, n_heads, head_dim = query.shape
        groups = key.shape[2]
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        scale = self.softmax_scale if self.softmax_scale is not None else 1 / math.sqrt(head_dim)
        dropout_p = self.dropout_p if self.training else 0.0
        forward_only = not (torch.is_grad_enabled() and q.requires_grad)
        outside = self._outside_window(sq, k.shape[2], q.device)
        if isinstance(attention_mask, DocumentMask):
            # Forward only: FlexAttention has no backward on CPU, so one could not be tested here.
            flex = document_attention_backend(q.device) == "flex" and outside is None
            if forward_only and dropout_p == 0 and flex:
                out = attention_mask.attend(q, k, v, scale)  # None: flex failed, use the mask
                if out is not None:
                    return out.permute(2, 0, 1, 3).reshape(sq, b, n_heads * head_dim)
            attention_mask = attention_mask.dense()
        if outside is not None:  # (the band masks later keys too: causal, and a KV-cache step)
            attention_mask = outside if attention_mask is None else attention_mask | outside
        if attention_mask is not None:
            sdpa_mask, is_causal = ~attention_mask, False
        else:
            # No mask tensor: SDPA may pick flash attention (GPU), which takes no explicit mask.
            sdpa_mask, is_causal = None, mask_type == AttnMaskType.causal
        gqa = {}
        if groups != n_heads:
            if sdpa_mask is None and _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                # Masked SDPA (memory-efficient kernel) wants as many key/value heads as query
                # heads: query heads g*r .. g*r+r-1 share group g (megatron's QKV layout).
                r = n_heads // groups
                k, v = (
                    t[:, :, None].expand(b, groups, r, *t.shape[2:]).flatten(1, 2) for t in (k, v)
                )
        # A model in eval mode runs forward-only jobs (the runtime loads every model so); a
        # training forward without a graph (activation recompute's first pass) keeps the kernel
        # its recompute will use.
        backends = _without_cudnn_attention() if not self.training else contextlib.nullcontext()
        rng = get_cuda_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with backends, rng:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, sdpa_mask, dropout_p, is_causal, scale=scale, **gqa
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, n_heads * head_dim)


@contextlib.contextmanager
def _without_cudnn_attention():
    """SDPA without its cuDNN backend, for models in eval mode (the scorer's length-sorted rows,
    generation, evaluation, the online reference). On sm90 with a recent cuDNN, SDPA tries cuDNN
    first, and cuDNN builds and caches one execution graph per (batch, length): 23-37 ms of host
    time each in public measurements (not measured here), and the scorer meets a new width in
    nearly every batch. Flash attention compiles nothing per shape and runs a head-dim-64 forward
    about as fast as cuDNN. Training keeps cuDNN: its shapes are fixed and its backward is the
    faster one on Hopper. The flag is process-wide and restored at once: correct while one thread
    runs the models (today's case; two threads running forwards at once could see each other's
    setting)."""
    was_enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was_enabled)


class FusedSwiGLUMLP(MLP):
    """megatron-core's ``MLP`` with its SwiGLU as one fused op (``ops.swiglu``: one pass over the
    ``[s, b, ffn]`` activations each way instead of three forward and five backward, and only
    ``linear_fc1``'s output kept for the backward). Same parameters, sharding and checkpoints;
    configurations other than a bias-free SwiGLU take megatron-core's own forward."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        c = self.config
        # getattr: fields that megatron-core versions of the supported range may lack
        self.fused = (
            c.gated_linear_unit
            and c.activation_func is torch.nn.functional.silu
            and not getattr(c, "bias_activation_fusion", False)
            and not getattr(c, "use_te_activation_func", False)
            and getattr(c, "glu_linear_offset", 0.0) == 0.0
            and getattr(c, "activation_func_clamp_value", None) is None
        )

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.fused or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))  # ([s, b, h], bias or None)


def _rope_mscale(config: TransformerConfig) -> float:
    """YaRN's attention scale of megatron-core's RoPE (1 without YaRN)."""
    try:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )
    except ImportError:  # a megatron-core without YaRN: no scale
        return 1.0
    return _yarn_get_concentration_factor_from_config(config)


class FusedRoPESelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` with its RoPE as one fused op (``ops.rope``: one pass
    over the query and the key each way instead of about six tensor ops). Megatron-core applies
    RoPE inside ``Attention.forward``, between the QKV projection and the core attention, and
    fuses it only with Transformer Engine; here ``forward`` takes ``rotary_pos_emb`` out of the
    call and ``get_query_key_value_tensors`` applies it to the query and key it returns (after
    their norms, where megatron-core applies it too). Calls it does not cover (inference
    contexts, packed THD sequences, YaRN, interleaved or partial rotation, layers without RoPE)
    take megatron-core's own path. Same parameters and checkpoints."""

    def __init__(self, config: TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        c = self.config
        self.fused_rope = (
            not c.rotary_interleaved
            and not getattr(c, "multi_latent_attention", False)
            and not getattr(c, "no_rope_freq", None)
            and not getattr(c, "fused_single_qkv_rope", False)
            and not getattr(c, "apply_rope_fusion", False)
            # offloading would offload the tables every layer saves (one shared pair)
            and not getattr(c, "fine_grained_activation_offloading", False)
            and _rope_mscale(c) == 1.0
        )
        self._rope_of_this_call = None

    def forward(self, *args, **kwargs):
        rope = kwargs.get("rotary_pos_emb")
        covered = (
            self.fused_rope
            and rope is not None
            and len(args) <= 2  # the rest by keyword (megatron-core's TransformerLayer does so)
            and kwargs.get("key_value_states") is None
            and kwargs.get("inference_context") is None
            and kwargs.get("inference_params") is None
            and kwargs.get("packed_seq_params") is None
            and kwargs.get("rotary_pos_cos") is None
            and kwargs.get("rotary_pos_sin") is None
        )
        if not covered:
            return super().forward(*args, **kwargs)
        self._rope_of_this_call = rope if isinstance(rope, tuple) else (rope, rope)
        try:
            return super().forward(*args, **{**kwargs, "rotary_pos_emb": None})
        finally:
            self._rope_of_this_call = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope_of_this_call is None:
            return qkv
        (q_freqs, k_freqs), (query, key, *rest) = self._rope_of_this_call, qkv
        # a None half is not rotated (megatron-core's rule)
        query = query if q_freqs is None else apply_rope(query, q_freqs)
        key = key if k_freqs is None else apply_rope(key, k_freqs)
        return (query, key, *rest)


class _SubclassedMLPWarning(logging.Filter):
    """megatron-core's ``TransformerLayer`` passes the TP group only to an MLP spec whose module is
    exactly ``MLP`` and warns "Unknown MLP type" for any other, subclasses included, once per
    layer of every model built. ``FusedSwiGLUMLP`` then takes the default TP group, the one it
    would be passed (every model here is built on ``parallel_state``'s groups): the warning says
    nothing, so it is dropped while our models are built."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


@contextlib.contextmanager
def subclassed_mlp_warning_dropped():
    """Inside, megatron-core's "Unknown MLP type" warning is dropped (``_SubclassedMLPWarning``)."""
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    quiet = _SubclassedMLPWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _qk_layernorm(config: TransformerConfig) -> bool:
    return bool(getattr(config, "qk_layernorm", False))


def _experts(config: TransformerConfig, moe: bool) -> dict:
    """megatron-core's layer-spec arguments of a mixture of experts (none for a dense MLP)."""
    experts = getattr(config, "num_moe_experts", None)
    if not experts or not moe:
        return {}
    return {"num_experts": experts, "moe_grouped_gemm": False}


def moe_layer_flags(config: TransformerConfig) -> list[bool]:
    """For each of the model's layers: its MLP is a mixture (megatron-core's ``moe_layer_freq``,
    which the provider sets as a pattern when not every layer has one)."""
    if not getattr(config, "num_moe_experts", None):
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    return [bool(x) for x in freq]


def _torch_layer_spec(config: TransformerConfig, moe: bool) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(
        normalization=config.normalization,
        qk_layernorm=_qk_layernorm(config),
        **_experts(config, moe),
    )
    sub = spec.submodules
    sub.input_layernorm = torch_norm(config)
    sub.pre_mlp_layernorm = torch_norm(config)
    if _qk_layernorm(config):  # megatron-core all-reduces their gradients over TP by name
        sub.self_attention.submodules.q_layernorm = torch_norm(config)
        sub.self_attention.submodules.k_layernorm = torch_norm(config)
    sub.self_attention.module = FusedRoPESelfAttention
    sub.self_attention.submodules.core_attention = TorchSDPAttention
    if not moe:  # (the experts are megatron-core's MLPs)
        sub.mlp.module = FusedSwiGLUMLP
    return spec


def _te_layer_spec(config: TransformerConfig, moe: bool) -> tuple[ModuleSpec, type]:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
    except ImportError as exc:
        raise ConfigError(
            "--transformer-impl te needs Transformer Engine (pip install megatron-slm[gpu]); "
            "use --transformer-impl local or torch"
        ) from exc
    spec = get_gpt_layer_with_transformer_engine_spec(
        qk_layernorm=_qk_layernorm(config), **_experts(config, moe)
    )
    return spec, TENorm


def default_spec_impl(device: torch.device) -> str:
    """``te`` on GPU when Transformer Engine is importable, else ``torch``.

    Not ``local`` on GPU: megatron-core's ``DotProductAttention`` materialises the
    ``[b, heads, s, s]`` scores and runs an unfused softmax over them, while the torch spec's
    SDPA runs flash attention (``--transformer-impl local`` still selects it). Measured on an
    H200 (torch 2.11, bf16, tinyllama-1.1b with 8 layers, seq 2048, micro-batch 4, global batch
    8, vocabulary 512): 96.9 ms per step, 39.7% MFU with ``torch`` (SDPA chose cuDNN's flash
    kernel); issue 26 measured 12.5% with ``local``.
    """
    if device.type != "cuda":
        return "torch"
    try:
        import transformer_engine  # noqa: F401

        return "te"
    except ImportError:
        return "torch"


def check_local_norms(zero_centered: bool) -> None:
    """--apply-layernorm-1p with --transformer-impl local: megatron-core's local norms are Apex's
    (which take zero-centred weights) or torch's (which do not)."""
    if not zero_centered:
        return
    try:
        import apex  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--apply-layernorm-1p: megatron-core's local norms without Apex have no "
            "zero-centred weights; use --transformer-impl torch or te"
        ) from None


def gpt_block_spec(
    impl: str, config: TransformerConfig, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """Decoder block (this pipeline stage's layers + final norm) for ``impl``; each layer's MLP
    a mixture of experts or dense, as :func:`moe_layer_flags` says for its global index."""
    if impl not in SPEC_IMPLS:
        raise ConfigError(f"--transformer-impl must be one of {SPEC_IMPLS}, got {impl!r}")
    if impl == "local":
        check_local_norms(config.layernorm_zero_centered_gamma)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    first = get_transformer_layer_offset(config, vp_stage=vp_stage)
    flags = moe_layer_flags(config)[first : first + num_layers]
    specs = {}
    for moe in {*flags, False}:  # (the final norm comes with the dense layer's spec)
        if impl == "te":
            specs[moe], final_norm = _te_layer_spec(config, moe)
        elif impl == "local":
            specs[moe] = get_gpt_layer_local_spec(
                normalization=config.normalization,
                qk_layernorm=_qk_layernorm(config),
                **_experts(config, moe),
            )
            final_norm = LocalSpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm")
        else:
            specs[moe], final_norm = _torch_layer_spec(config, moe), torch_norm(config)
    return TransformerBlockSubmodules(
        layer_specs=[specs[moe] for moe in flags], layer_norm=final_norm
    )


class _BlockNorms(LocalSpecProvider):
    """megatron-core's local backend with the decoder block's norm class (the torch spec's
    norms run under sequence parallelism, megatron-core's WrappedTorchNorm does not)."""

    def __init__(self, norm: type):
        self.norm = norm

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return self.norm


def mtp_block_spec(
    impl: str, config: TransformerConfig, block: TransformerBlockSubmodules, vp_stage=None
):
    """--mtp-num-layers: megatron-core's multi-token prediction block for ``impl``; each head's
    transformer layer is the decoder's last (dense or a mixture, as DeepSeek-V3's), its norms the
    block's final norm's class, its projection a column-parallel linear."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_mtp_block_spec,
        get_gpt_mtp_block_spec_for_backend,
    )

    layer = block.layer_specs[-1]
    if impl == "te":
        return get_gpt_mtp_block_spec(config, layer, use_transformer_engine=True, vp_stage=vp_stage)
    return get_gpt_mtp_block_spec_for_backend(
        config, layer, backend=_BlockNorms(block.layer_norm), vp_stage=vp_stage
    )
