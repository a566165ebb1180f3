"""The model flags every entry point shares (trainer, scorer, evaluator, converter, new tools).

A user's ``MODEL_ARGS`` mean the same thing everywhere: a preset plus explicit overrides, or, with
no preset and the whole shape given (``--num-layers``, ``--hidden-size``, ``--num-attention-heads``:
a Megatron-LM script's model), Megatron-LM's own defaults for the rest. Without a
checkpoint they define the architecture (the vocabulary comes from the tokenizer); with one
(``--load``) the checkpoint's recorded architecture is used and these flags may only confirm it
(``megatron_slm.checkpoint.resolve_architecture``, Megatron-LM's ``--use-checkpoint-args``).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass

from megatron_slm.cli import arg, check_choices
from megatron_slm.errors import ConfigError
from megatron_slm.models.presets import (
    GPT3_KIND,
    NORMALIZATIONS,
    POSITION_EMBEDDINGS,
    ROUTER_SCORE_FUNCTIONS,
    GPTModelConfig,
    Yarn,
    get_preset,
    yarn_mscale,
)

DEFAULT_PRESET = "tiny"
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")  # megatron-core's AttnBackend
_OWN_FUSIONS = (
    "Accepted in either form (Megatron-LM's flag): megatron-slm chooses its fused kernels itself, "
    "each tested against megatron-core's unfused path."
)
DEFAULT_VOCAB_DIVISOR = 128
YARN_FLAGS = ("rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast",
              "yarn_beta_slow", "mscale", "mscale_all_dim")  # fmt: skip
MOE_ARCHITECTURE_FLAGS = (
    "moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax", "moe_layer_freq",
    "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_router_score_function",
    "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_enable_expert_bias",
)  # fmt: skip
"""The architecture flags of a mixture (each needs --num-experts)."""
# With these three and no preset, the flags are a Megatron-LM script's model definition.
MEGATRON_SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads")
ARCHITECTURE_FLAGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "max_position_embeddings",
    "rotary_base",
    "norm_epsilon",
    "num_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
)


@dataclass
class ModelArgs:
    model_preset: str | None = arg(
        None,
        f"Architecture preset (tiny, tinyllama-1.1b, mistral-7b, pangu-pi-1b-pro, "
        f"pangu-pi-1.5b-pro: all Llama-style). Default: the --load checkpoint's architecture; "
        f"else, with --num-layers, --hidden-size and --num-attention-heads all given, "
        f"Megatron-LM's defaults for the rest: GPT-3's architecture (LayerNorm, GeLU, learned "
        f"positions, biases, tied embeddings) unless the architecture flags say otherwise, FFN "
        f"width 4h (with --swiglu int(8h/3 / 64) * 64), one KV group per head; "
        f"--max-position-embeddings required; else {DEFAULT_PRESET}.",
    )
    num_layers: int | None = arg(None, "Override the preset's number of layers.")
    hidden_size: int | None = arg(None, "Override the preset's hidden size.")
    ffn_hidden_size: int | None = arg(None, "Override the preset's SwiGLU width.")
    num_attention_heads: int | None = arg(None, "Override the preset's query heads.")
    num_query_groups: int | None = arg(None, "Override the preset's key/value heads (GQA).")
    max_position_embeddings: int | None = arg(None, "Override the preset's maximum length.")
    rotary_base: float | None = arg(None, "Override the preset's RoPE base.")
    use_rope_scaling: bool = arg(
        False,
        "Llama 3.1's RoPE scaling (Megatron-LM's flag; megatron-core's: low/high frequency "
        "factors 1 and 4 over 8192 original positions), by --rope-scaling-factor.",
    )
    rope_scaling_factor: float | None = arg(
        None, "With --use-rope-scaling: the factor (Megatron-LM's default 8; Llama 3.2: 32)."
    )
    rotary_seq_len_interpolation_factor: float | None = arg(
        None,
        "RoPE's linear position interpolation (Megatron-LM's flag): positions divided by the "
        "factor, to stretch a model's trained context (Hugging Face's linear RoPE scaling).",
    )
    norm_epsilon: float | None = arg(None, "Override the preset's RMSNorm epsilon.")
    make_vocab_size_divisible_by: int | None = arg(
        None,
        f"Pad the vocabulary to a multiple of this x TP (default {DEFAULT_VOCAB_DIVISOR}; a loaded "
        "checkpoint keeps its padded vocabulary at any TP that divides it).",
    )
    padded_vocab_size: int | None = arg(
        None,
        "The model's vocabulary rows (Megatron-LM's flag): at least the tokenizer's ids and a "
        "multiple of TP; it replaces --make-vocab-size-divisible-by's padding (a loaded "
        "checkpoint must have as many).",
    )
    transformer_impl: str | None = arg(
        None,
        "Layer implementation: te (Megatron-LM's transformer_engine), local or torch (default: "
        "te on GPU when installed, else torch).",
    )
    init_method_std: float | None = arg(
        None,
        "Std of the normal initialisation of new weights (default 0.02); a loaded checkpoint's "
        "weights are its own.",
    )
    use_cpu_initialization: bool = arg(
        False,
        "Draw new weights on the host and copy them to the device (Megatron-LM's flag): "
        "megatron-core draws each whole matrix and splits it, so the weights are the same at "
        "any tensor-parallel size. Always so on CPU.",
    )
    init_method_xavier_uniform: bool = arg(
        False,
        "Initialise new weights (every linear layer and the embedding) with torch's Xavier "
        "uniform instead of the normal of --init-method-std (Megatron-LM's flag).",
    )
    attention_dropout: float = arg(
        0.0,
        "Dropout on the attention probabilities while training (Megatron-LM's default is 0.1; "
        "Llama-style pretraining uses none). Scoring and evaluation never drop.",
    )
    hidden_dropout: float = arg(
        0.0,
        "Dropout on each layer's attention and MLP outputs while training (Megatron-LM's "
        "default is 0.1).",
    )
    attention_backend: str = arg(
        "auto",
        "Megatron-LM's attention kernel choice, given to megatron-core: Transformer Engine's "
        "attention (--transformer-impl te) takes flash, fused or unfused; local selects "
        "--transformer-impl local. The torch spec lets SDPA choose (flash on GPU).",
        choices=ATTENTION_BACKENDS,
    )
    apply_query_key_layer_scaling: bool = arg(
        False,
        "Megatron-LM's fp16 guard, given to megatron-core: its own attention (--transformer-impl "
        "local) divides Q.K^T by the layer number and multiplies it back in its fp32 softmax; "
        "the same attention (SDPA and Transformer Engine's need no guard).",
    )
    # Megatron-LM's architecture flags. With a preset they override its (Llama) choices; with a
    # Megatron-LM script's shape they change Megatron-LM's GPT-3 defaults, one choice each.
    use_mcore_models: bool = arg(False, "Accepted: models are always megatron-core's.")
    group_query_attention: bool = arg(
        False, "Accepted: grouped-query attention follows --num-query-groups."
    )
    swiglu: bool = arg(
        False, "SwiGLU MLP (the presets' own); without it a Megatron-LM script's model has GeLU."
    )
    openai_gelu: bool = arg(
        False,
        "GeLU's tanh approximation in the MLP (GPT-2's gelu_new). Megatron-LM reads this flag "
        "only in its legacy models (its megatron-core models keep the exact GeLU); here it "
        "gives the model the tanh GeLU.",
    )
    squared_relu: bool = arg(
        False, "relu(x)^2 in the MLP (Megatron-LM's flag, as in Nemotron), one up projection."
    )
    untie_embeddings_and_output_weights: bool = arg(
        False,
        "Separate input and output embedding weights (the presets' own); without it a "
        "Megatron-LM script's model ties them.",
    )
    disable_bias_linear: bool = arg(
        False,
        "No biases in the linear layers (the presets' own); without it a Megatron-LM script's "
        "model has them.",
    )
    normalization: str | None = arg(
        None,
        "RMSNorm or LayerNorm (default: the preset's RMSNorm; a Megatron-LM script's LayerNorm).",
        choices=NORMALIZATIONS,
    )
    position_embedding_type: str | None = arg(
        None,
        "rope or learned_absolute (default: the preset's rope; a Megatron-LM script's learned "
        "absolute positions, which need --seq-length <= --max-position-embeddings), or yarn: "
        "RoPE extended by YaRN (--rotary-scaling-factor and the --yarn-* flags).",
        choices=(*POSITION_EMBEDDINGS, "yarn"),
    )
    qk_layernorm: bool = arg(
        False, "Normalise each head's query and key (Qwen3's, OLMo 2's), with the model's norm."
    )
    add_qkv_bias: bool = arg(
        False, "Biases on the query, key and value projections only (Qwen2's)."
    )
    rotary_percent: float | None = arg(
        None,
        "The share of each head's channels RoPE rotates (Megatron-LM's flag; Nemotron's 0.5; "
        "default: all).",
    )
    rotary_scaling_factor: float | None = arg(
        None,
        "With --position-embedding-type yarn: how many times longer than "
        "--yarn-original-max-position-embeddings the context becomes (YaRN's factor; "
        "Megatron-LM's flag, default 1: no extension).",
    )
    yarn_original_max_position_embeddings: int | None = arg(
        None, "YaRN: the context length the model was trained at (Megatron-LM's default 4096)."
    )
    yarn_beta_fast: float | None = arg(
        None, "YaRN: frequencies turning more often than this over the original length keep "
        "their value (default 32)."
    )  # fmt: skip
    yarn_beta_slow: float | None = arg(
        None, "YaRN: frequencies turning less often than this are divided by the factor "
        "(default 1)."
    )  # fmt: skip
    yarn_correction_range_round_to_int: bool = arg(
        True, "YaRN: round the bounds of the blended frequencies out to integers (transformers' "
        "truncate)."
    )  # fmt: skip
    mscale: float | None = arg(
        None, "YaRN's attention factor is (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim "
        "ln(factor) + 1) (Megatron-LM's flags; defaults 1 and 0)."
    )  # fmt: skip
    mscale_all_dim: float | None = arg(None, "See --mscale.")
    kv_channels: int | None = arg(
        None,
        "Each attention head's size (default --hidden-size / --num-attention-heads; Qwen3-0.6B: "
        "128 on a width of 1024 with 16 heads).",
    )
    no_position_embedding: bool = arg(
        False,
        "Accepted with RoPE (Megatron-LM's older flag): there is no learned position table. "
        "Refused with learned absolute positions.",
    )
    use_flash_attn: bool = arg(
        False,
        "Accepted (Megatron-LM's older flag): flash attention is used where the layer spec has it "
        "(TE's attention; the torch spec's SDPA on GPU).",
    )
    attention_softmax_in_fp32: bool = arg(
        False,
        "Accepted (Megatron-LM's flag): megatron-core's unfused attention (--transformer-impl "
        "local) already takes its softmax in fp32; SDPA and Transformer Engine choose their own.",
    )
    masked_softmax_fusion: bool = arg(True, _OWN_FUSIONS)
    bias_gelu_fusion: bool = arg(True, _OWN_FUSIONS)
    persist_layer_norm: bool = arg(True, _OWN_FUSIONS)
    rope_fusion: bool = arg(True, _OWN_FUSIONS)
    gradient_accumulation_fusion: bool = arg(True, _OWN_FUSIONS)
    bias_swiglu_fusion: bool = arg(True, _OWN_FUSIONS)
    bias_dropout_fusion: bool = arg(True, _OWN_FUSIONS)
    use_rotary_position_embeddings: bool = arg(
        False, "Megatron-LM's older flag for --position-embedding-type rope."
    )
    apply_layernorm_1p: bool = arg(
        False,
        "Zero-centred norm weights, applied as weight + 1 (Megatron-LM's flag, Nemotron's): "
        "weight decay pulls them towards 1. With --transformer-impl torch (the default on CPU) "
        "or te.",
    )
    window_size: str | None = arg(
        None,
        "Sliding-window attention, Megatron-LM's LEFT,RIGHT: each token attends to itself and "
        "the LEFT tokens before it (causal: RIGHT 0; Mistral-7B: 4095,0; -1,0: no window).",
    )
    num_experts: int | None = arg(
        None,
        "Mixture of experts: every layer's MLP is this many experts behind a linear router "
        "(megatron-core's MoELayer; Megatron-LM's flag). Default: a dense MLP.",
    )
    moe_router_topk: int | None = arg(
        None, "With --num-experts: experts per token (Megatron-LM's default 2)."
    )
    moe_ffn_hidden_size: int | None = arg(
        None, "With --num-experts: each expert's inner width (default --ffn-hidden-size)."
    )
    moe_router_pre_softmax: bool = arg(
        False,
        "With --num-experts: weigh the chosen experts by the softmax over all of them (else over "
        "the top-k logits, Mixtral's).",
    )
    moe_layer_freq: str | None = arg(
        None,
        "With --num-experts: which layers have a mixture, the others a dense MLP of "
        "--ffn-hidden-size (Megatron-LM's flag): N, a mixture in layers 0, N, 2N, ...; or a "
        'pattern of one 0 (dense) or 1 per layer, such as "([0]+[1]*23)". Default: every layer.',
    )
    moe_shared_expert_intermediate_size: int | None = arg(
        None,
        "With --num-experts: a shared expert of this width beside the routed ones in every "
        "mixture, run by every token (Megatron-LM's flag; Qwen-MoE's and DeepSeek's).",
    )
    moe_shared_expert_gate: bool = arg(
        False,
        "With --moe-shared-expert-intermediate-size: the shared expert's output scaled by a "
        "learned sigmoid gate per token (megatron-core's; Qwen2-MoE's shared_expert_gate).",
    )
    moe_router_score_function: str | None = arg(
        None,
        "With --num-experts: the router's scores, softmax (default) or sigmoid (DeepSeek-V3's: "
        "the chosen experts weighted by their sigmoid scores over their sum).",
        choices=ROUTER_SCORE_FUNCTIONS,
    )
    moe_router_topk_scaling_factor: float | None = arg(
        None, "With --num-experts: the chosen experts' weights multiplied by this factor."
    )
    moe_router_num_groups: int | None = arg(
        None,
        "With --num-experts: group-limited routing (DeepSeek's): the experts in this many equal "
        "groups, each token's experts drawn from its --moe-router-group-topk best groups.",
    )
    moe_router_group_topk: int | None = arg(
        None, "With --moe-router-num-groups: the groups a token's experts come from."
    )
    moe_router_enable_expert_bias: bool = arg(
        False,
        "With --moe-router-score-function sigmoid: auxiliary-loss-free load balancing "
        "(DeepSeek-V3's): a per-expert bias on the scores that choose the experts, moved each "
        "step by --moe-router-bias-update-rate towards balance.",
    )

    def __post_init__(self):
        if self.window_size is not None:
            parse_window_size(self.window_size)  # a bad value fails here, naming the flag
        if self.transformer_impl == "transformer_engine":  # Megatron-LM's name
            self.transformer_impl = "te"
        if self.model_preset is not None:
            get_preset(self.model_preset)  # unknown preset -> error naming --model-preset
        if self.transformer_impl not in (None, "te", "local", "torch"):
            raise ConfigError(
                "--transformer-impl must be te (or transformer_engine), local or torch, got "
                f"{self.transformer_impl!r}"
            )
        if self.make_vocab_size_divisible_by is not None and self.make_vocab_size_divisible_by < 1:
            raise ConfigError("--make-vocab-size-divisible-by must be >= 1")
        if self.padded_vocab_size is not None and self.padded_vocab_size < 1:
            raise ConfigError("--padded-vocab-size must be >= 1")
        check_choices(self, "attention_backend")
        for name in ("normalization", "position_embedding_type"):
            if getattr(self, name) is not None:
                check_choices(self, name)
        if self.use_rotary_position_embeddings and self.position_embedding_type not in (
            None,
            "rope",
            "yarn",
        ):
            raise ConfigError(
                "--use-rotary-position-embeddings contradicts --position-embedding-type "
                f"{self.position_embedding_type}"
            )
        activations = [f for f in ("swiglu", "openai_gelu", "squared_relu") if getattr(self, f)]
        if len(activations) > 1:
            raise ConfigError(
                " and ".join(f"--{f.replace('_', '-')}" for f in activations) + " are exclusive:"
                " the MLP has one activation"
            )
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1)")
        if self.rope_scaling_factor is not None and not self.use_rope_scaling:
            raise ConfigError("--rope-scaling-factor needs --use-rope-scaling")
        if self.position_embedding_type != "yarn":
            yarn = [f for f in YARN_FLAGS if getattr(self, f) is not None]
            if not self.yarn_correction_range_round_to_int:
                yarn.append("no_yarn_correction_range_round_to_int")
            if yarn:
                raise ConfigError(
                    f"--{yarn[0].replace('_', '-')} needs --position-embedding-type yarn"
                )
        if self.init_method_std is not None and self.init_method_std <= 0:
            raise ConfigError("--init-method-std must be positive")
        if self.init_method_xavier_uniform and self.init_method_std is not None:
            raise ConfigError(
                "--init-method-xavier-uniform replaces the normal initialisation of "
                "--init-method-std: give one of them"
            )
        if self.moe_layer_freq is not None:
            parse_moe_layer_freq(self.moe_layer_freq)  # a bad value fails here, naming the flag
        moe = [f for f in MOE_ARCHITECTURE_FLAGS if getattr(self, f) not in (None, False)]
        if moe and self.num_experts is None:
            raise ConfigError(f"--{moe[0].replace('_', '-')} needs --num-experts")
        if self.attention_backend == "local" and self.transformer_impl not in (None, "local"):
            raise ConfigError(
                f"--attention-backend local is megatron-core's local attention: it contradicts "
                f"--transformer-impl {self.transformer_impl}"
            )

    def overrides(self) -> dict:
        """The architecture fields the flags give explicitly (not None)."""
        given = {k: getattr(self, k) for k in ARCHITECTURE_FLAGS if getattr(self, k) is not None}
        if self.rotary_seq_len_interpolation_factor is not None:
            given["rope_interpolation_factor"] = self.rotary_seq_len_interpolation_factor
        if self.use_rope_scaling:  # (Megatron-LM's default factor)
            given["rope_scaling_factor"] = self.rope_scaling_factor or 8.0
        if self.normalization is not None:
            given["normalization"] = self.normalization
        for activation in ("swiglu", "openai_gelu", "squared_relu"):
            if getattr(self, activation):
                given["activation"] = activation
        if self.position_embedding_type is not None or self.use_rotary_position_embeddings:
            given["position_embedding_type"] = self.position_embedding_type or "rope"
        if self.position_embedding_type == "yarn":  # (RoPE, with YaRN's frequencies)
            given["position_embedding_type"] = "rope"
            given["yarn"] = self.yarn()
        if self.disable_bias_linear:
            given["add_bias_linear"] = False
        if self.untie_embeddings_and_output_weights:
            given["tied_embeddings"] = False
        for name in ("qk_layernorm", "add_qkv_bias", "apply_layernorm_1p"):
            if getattr(self, name):
                given[name] = True
        if self.rotary_percent is not None:
            given["rotary_percent"] = self.rotary_percent
        if self.window_size is not None and parse_window_size(self.window_size) is not None:
            given["window_size"] = parse_window_size(self.window_size)
        for name in ("moe_router_pre_softmax", "moe_shared_expert_gate",
                     "moe_router_enable_expert_bias"):  # fmt: skip
            if getattr(self, name):
                given[name] = True
        for name in ("moe_router_score_function", "moe_router_topk_scaling_factor",
                     "moe_router_num_groups", "moe_router_group_topk"):  # fmt: skip
            if getattr(self, name) is not None:
                given[name] = getattr(self, name)
        if self.moe_layer_freq is not None:  # (a pattern's length is checked with the layers)
            given["moe_layer_freq"] = parse_moe_layer_freq(self.moe_layer_freq)
        return given

    @property
    def megatron_lm_shape(self) -> bool:
        """No preset and the whole shape given: a Megatron-LM script's model definition."""
        given = all(getattr(self, name) is not None for name in MEGATRON_SHAPE_FLAGS)
        return self.model_preset is None and given

    def architecture(self, vocab_size: int) -> GPTModelConfig:
        """The architecture these flags describe on their own (no checkpoint): the preset with
        the overrides, or a Megatron-LM script's shape with Megatron-LM's defaults."""
        if self.megatron_lm_shape:
            arch = self._megatron_lm_architecture(vocab_size)
        else:
            arch = get_preset(self.model_preset or DEFAULT_PRESET).replace(
                vocab_size=vocab_size,
                init_method_std=self.init_method_std,
                kv_channels=self.kv_channels,
                **self.overrides(),
            )
        self.check_head_size(arch)
        if self.no_position_embedding and arch.position_embedding_type != "rope":
            raise ConfigError(
                "--no-position-embedding: megatron-core's models have a learned position table "
                "or RoPE; give --position-embedding-type rope"
            )
        return arch

    def _megatron_lm_architecture(self, vocab_size: int) -> GPTModelConfig:
        """What Megatron-LM builds from a script's flags: GPT-3's architecture changed by each
        architecture flag given, the FFN width ``4 h`` (with ``--swiglu``, ``validate_args``'s
        ``int((4 h * 2/3) / 64) * 64``), one key/value group per head (MHA; one in all with
        ``--group-query-attention``), RoPE base 10000, epsilon 1e-5, std 0.02;
        ``--max-position-embeddings`` is required, as there."""
        if self.max_position_embeddings is None:
            raise ConfigError(
                "--max-position-embeddings is required with --num-layers, --hidden-size and "
                "--num-attention-heads and no --model-preset (as in Megatron-LM)"
            )
        h = self.hidden_size
        kind = {**GPT3_KIND, **{k: v for k, v in self.overrides().items() if k in GPT3_KIND}}
        swiglu_width = int((4 * h * 2 / 3) / 64) * 64
        ffn = self.ffn_hidden_size or (swiglu_width if kind["activation"] == "swiglu" else 4 * h)
        if ffn < 1:
            raise ConfigError(
                f"--hidden-size {h}: Megatron-LM's SwiGLU width int(8h/3 / 64) * 64 is 0; "
                "give --ffn-hidden-size"
            )
        base = GPTModelConfig(
            num_layers=self.num_layers,
            hidden_size=h,
            ffn_hidden_size=ffn,
            num_attention_heads=self.num_attention_heads,
            # Megatron-LM: MHA, unless --group-query-attention (whose --num-query-groups is 1)
            num_query_groups=self.num_query_groups
            or (1 if self.group_query_attention else self.num_attention_heads),
            vocab_size=vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            kv_channels=self.kv_channels,
            **kind,
        )
        return base.replace(init_method_std=self.init_method_std, **self.overrides())

    def check_head_size(self, arch: GPTModelConfig, where: str = "") -> None:
        """--kv-channels, when given, is ``arch``'s head size (a checkpoint's: the flag may only
        confirm it)."""
        if self.kv_channels is not None and self.kv_channels != arch.head_dim:
            raise ConfigError(
                f"--kv-channels {self.kv_channels} is not the head size of {where or 'the model'}"
                f" ({arch.head_dim})"
            )

    @property
    def spec_impl(self) -> str | None:
        """--transformer-impl, or local when --attention-backend local asks for it."""
        return self.transformer_impl or ("local" if self.attention_backend == "local" else None)

    def yarn(self) -> Yarn:
        """--position-embedding-type yarn's :class:`Yarn`, with Megatron-LM's defaults and its
        attention factor (megatron-core's concentration factor)."""
        factor = 1.0 if self.rotary_scaling_factor is None else self.rotary_scaling_factor
        mscale = 1.0 if self.mscale is None else self.mscale
        all_dim = 0.0 if self.mscale_all_dim is None else self.mscale_all_dim
        return Yarn(
            factor=factor,
            original_max_positions=self.yarn_original_max_position_embeddings or 4096,
            attention_factor=yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim),
            beta_fast=32.0 if self.yarn_beta_fast is None else self.yarn_beta_fast,
            beta_slow=1.0 if self.yarn_beta_slow is None else self.yarn_beta_slow,
            truncate=self.yarn_correction_range_round_to_int,
        )

    def record(self) -> dict:
        """What a checkpoint records about how its architecture was chosen."""
        overrides = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                     for k, v in self.overrides().items()}  # fmt: skip
        return {"model_preset": self.model_preset, "overrides": overrides}

    @property
    def vocab_divisor(self) -> int:
        return self.make_vocab_size_divisible_by or DEFAULT_VOCAB_DIVISOR


def packed_documents_spec(impl: str | None, why: str) -> str:
    """The layer spec of a model given rows that pack several documents, each attending only to
    itself (``why``: the flag that asks for it): the torch spec, whose attention honours the
    block-diagonal mask. Transformer Engine applies its own causal mask and ignores a given one,
    and megatron-core's local attention replaces it by its band with a sliding window (or ignores
    it with its fused causal softmax), so the documents would attend to each other: another
    ``--transformer-impl`` is refused."""
    if impl not in (None, "torch"):
        raise ConfigError(
            f"{why} separates packed documents with a block-diagonal attention mask, which "
            f"--transformer-impl {impl} does not honour: use --transformer-impl torch"
        )
    return "torch"


def parse_window_size(text: str) -> int | None:
    """``--window-size LEFT,RIGHT`` (Megatron-LM's tuple) -> LEFT, or None for ``-1,0`` (an
    infinite window: plain causal attention). RIGHT must be 0: a GPT attends to no later token."""
    try:
        left, right = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--window-size {text!r}: give LEFT,RIGHT, e.g. 4095,0") from None
    if right != 0:
        raise ConfigError(f"--window-size {text}: RIGHT must be 0 (causal attention)")
    if left == -1:
        return None
    if left < 1:
        raise ConfigError(f"--window-size {text}: LEFT must be >= 1 (or -1: no window)")
    return left


_PATTERN_NODES = (ast.Expression, ast.List, ast.Load, ast.Constant, ast.BinOp, ast.Add, ast.Mult)


def parse_moe_layer_freq(text: str) -> int | list[int]:
    """--moe-layer-freq: Megatron-LM's N, or its pattern: a list expression of integers, ``+``
    and ``*`` only (``([1]*3+[0])*2``), evaluated here without Python's ``eval``."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        tree = ast.parse(text, mode="eval")
        if not all(isinstance(node, _PATTERN_NODES) for node in ast.walk(tree)):
            raise ValueError
        value = _evaluate_pattern(tree.body)
        if not isinstance(value, list) or not all(isinstance(x, int) for x in value):
            raise ValueError
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        raise ConfigError(
            f'--moe-layer-freq {text!r}: give N or a pattern of 0s and 1s such as "([0]+[1]*23)"'
        ) from None
    return value


def _evaluate_pattern(node):
    if isinstance(node, ast.Constant):
        if type(node.value) is not int:
            raise ValueError
        return node.value
    if isinstance(node, ast.List):
        return [_evaluate_pattern(x) for x in node.elts]
    left, right = _evaluate_pattern(node.left), _evaluate_pattern(node.right)
    if isinstance(node.op, ast.Add):
        return left + right
    times, items = (left, right) if isinstance(left, int) else (right, left)
    if not isinstance(times, int) or not isinstance(items, list):
        raise ValueError  # (a pattern repeats lists)
    if times * len(items) > 100_000:
        raise ValueError  # more layers than any model has
    return items * times


def flag_text(name: str, value) -> str:
    """How a user says architecture field ``name`` = ``value`` in Megatron-LM's flags."""
    if name == "activation":
        return "GeLU (no activation flag)" if value == "gelu" else f"--{value.replace('_', '-')}"
    if name == "rope_interpolation_factor":
        flag = "--rotary-seq-len-interpolation-factor"
        return f"no {flag}" if value is None else f"{flag} {value:g}"
    if name == "add_bias_linear":
        return "biases (no --disable-bias-linear)" if value else "--disable-bias-linear"
    if name == "rotary_percent":
        return f"--rotary-percent {value:g}"
    if name == "window_size":
        return "no --window-size" if value is None else f"--window-size {value},0"
    if name == "num_experts":
        return "a dense MLP (no --num-experts)" if value is None else f"--num-experts {value}"
    if name == "longrope":
        return "no LongRoPE" if value is None else "LongRoPE (its Hugging Face config's)"
    if name == "yarn":
        if value is None:
            return "no YaRN (no --position-embedding-type yarn)"
        return (
            f"YaRN x{value.factor:g} beyond {value.original_max_positions} positions "
            f"(attention x{value.attention_factor:.4g})"
        )
    if name in ("moe_router_pre_softmax", "moe_shared_expert_gate",
                "moe_router_enable_expert_bias"):  # fmt: skip
        flag = f"--{name.replace('_', '-')}"
        return flag if value else f"no {flag}"
    if name == "moe_layer_freq":
        pattern = str(list(value)).replace(" ", "") if isinstance(value, (list, tuple)) else value
        return "a mixture in every layer" if value is None else f"--moe-layer-freq {pattern}"
    if name == "moe_shared_expert_intermediate_size" and value is None:
        return "no shared expert (no --moe-shared-expert-intermediate-size)"
    if name.startswith("moe_router_") and value is None:
        return f"no --{name.replace('_', '-')}"
    if name in ("qk_layernorm", "add_qkv_bias", "apply_layernorm_1p"):
        flag = f"--{name.replace('_', '-')}"
        return flag if value else f"no {flag}"
    if name == "tied_embeddings":
        return (
            "tied embeddings (no --untie-embeddings-and-output-weights)"
            if value
            else "--untie-embeddings-and-output-weights"
        )
    return f"--{name.replace('_', '-')} {value}"
