"""GPT architectures: the typed model config and the named presets.

Two families, as Megatron-LM builds them:

* **Llama** (every preset): RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied input
  and output embeddings: Llama 2, TinyLlama, Mistral, PanGu-pi Pro.
* **GPT-3** (Megatron-LM's default when a script names no architecture flag): LayerNorm, GeLU,
  learned absolute positions, biases in every linear layer, the output layer tied to the input
  embedding.

Each choice is its own field, so a script may mix them as Megatron-LM's flags do; Qwen's
additions (a norm on each head's query and key, QKV-only biases, heads that do not split the
width) are fields too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_slm.errors import ConfigError
from megatron_slm.models.pipeline_layout import parse_pipeline_layout

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
ACTIVATIONS = {"swiglu": "SwiGLU", "gelu": "GeLU", "openai_gelu": "tanh GeLU",
               "squared_relu": "squared ReLU"}  # fmt: skip
"""The MLP's activations and how the log names them (only SwiGLU is gated)."""
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
KIND_FIELDS = ("normalization", "activation", "position_embedding_type", "add_bias_linear",
               "tied_embeddings", "qk_layernorm", "add_qkv_bias", "apply_layernorm_1p",
               "rotary_percent")  # fmt: skip
"""The architecture's kind (its Llama, GPT-3, Qwen or Nemotron choices), beside its shape."""
LLAMA_KIND = {"normalization": "RMSNorm", "activation": "swiglu", "position_embedding_type": "rope",
              "add_bias_linear": False, "tied_embeddings": False, "qk_layernorm": False,
              "add_qkv_bias": False, "apply_layernorm_1p": False,
              "rotary_percent": 1.0}  # fmt: skip
GPT3_KIND = {"normalization": "LayerNorm", "activation": "gelu",
             "position_embedding_type": "learned_absolute", "add_bias_linear": True,
             "tied_embeddings": True, "qk_layernorm": False, "add_qkv_bias": False,
             "apply_layernorm_1p": False, "rotary_percent": 1.0}  # fmt: skip
NEMOTRON_KIND = {"normalization": "LayerNorm", "activation": "squared_relu",
                 "position_embedding_type": "rope", "add_bias_linear": False,
                 "tied_embeddings": False, "qk_layernorm": False, "add_qkv_bias": False,
                 "apply_layernorm_1p": True, "rotary_percent": 0.5}  # fmt: skip
"""Nemotron-4's (and its pruned Minitron's): Megatron-LM's --apply-layernorm-1p --squared-relu
--rotary-percent 0.5 --disable-bias-linear --untie-embeddings-and-output-weights."""


@dataclass(frozen=True)
class LongRope:
    """LongRoPE (Phi-3's ``longrope`` RoPE scaling; imported from Hugging Face, no flag): RoPE
    frequency ``i`` divided by ``short_factor[i]`` in a forward over at most
    ``original_max_positions`` positions, by ``long_factor[i]`` beyond, and the rotated query and
    key channels scaled by ``attention_factor`` (the cosine and sine are)."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_positions: int
    attention_factor: float

    def __post_init__(self):
        for name in ("short_factor", "long_factor"):  # a checkpoint's JSON holds lists
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if not all(x > 0 for x in (*self.short_factor, *self.long_factor)):
            raise ConfigError("LongRoPE: the short and long factors must be positive")
        if self.original_max_positions < 1 or self.attention_factor <= 0:
            raise ConfigError(
                "LongRoPE: original_max_positions must be >= 1 and the attention factor positive"
            )

    @staticmethod
    def derived_attention_factor(factor: float, original: int) -> float:
        """transformers' attention factor for a config that gives none: from the context
        extension ``factor`` (Phi-3: ``max_position_embeddings`` over the original length)."""
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 * mscale * ln(scale) + 1`` (1 for no extension), as transformers and
    megatron-core compute it."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class Yarn:
    """YaRN (``--position-embedding-type yarn``; Hugging Face's ``yarn`` RoPE scaling): each
    rotated frequency blends its original value (fast rotations: more than ``beta_fast`` turns
    over ``original_max_positions``) with its value divided by ``factor`` (slow ones: fewer than
    ``beta_slow``), linearly in between over the frequency index (the bounds rounded out to
    integers when ``truncate``); the cosine and sine are multiplied by ``attention_factor``."""

    factor: float
    original_max_positions: int
    attention_factor: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    def __post_init__(self):
        if self.factor < 1 or self.original_max_positions < 1 or self.attention_factor <= 0:
            raise ConfigError(
                f"YaRN: the factor must be >= 1 (got {self.factor:g}), the original length >= 1 "
                f"(got {self.original_max_positions}) and the attention factor positive (got "
                f"{self.attention_factor:g})"
            )
        if not self.beta_fast > self.beta_slow > 0:
            raise ConfigError(
                f"YaRN: --yarn-beta-fast {self.beta_fast:g} must exceed --yarn-beta-slow "
                f"{self.beta_slow:g} > 0"
            )


SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups")  # fmt: skip
"""The transformer's shape: its depth, width and heads (what inheritance cuts down)."""


@dataclass(frozen=True)
class GPTModelConfig:
    """Architecture of a GPT (Megatron-LM flag names in the field docs); Llama's by default."""

    num_layers: int
    """--num-layers: transformer layers."""
    hidden_size: int
    """--hidden-size: model width."""
    ffn_hidden_size: int
    """--ffn-hidden-size: the MLP's inner width (SwiGLU: the gate and up projections each have
    this width)."""
    num_attention_heads: int
    """--num-attention-heads: query heads."""
    num_query_groups: int
    """--num-query-groups: key/value heads (grouped-query attention); = heads for plain MHA."""
    vocab_size: int
    """--vocab-size: tokenizer vocabulary; padded for TP by --make-vocab-size-divisible-by."""
    max_position_embeddings: int
    """--max-position-embeddings: longest sequence the preset was trained with."""
    kv_channels: int | None = None
    """--kv-channels: each attention head's size when it is not --hidden-size /
    --num-attention-heads (Qwen3-0.6B: 16 heads of 128 on a width of 1024); None: that quotient."""
    rotary_base: float = 10000.0
    """--rotary-base: RoPE theta."""
    rope_scaling_factor: float | None = None
    """--use-rope-scaling with --rope-scaling-factor: Llama 3.1's RoPE scaling (megatron-core's:
    frequencies with wavelengths beyond 8192 positions / 1 divided by the factor, those under
    8192 / 4 kept, smoothly in between); None: plain RoPE."""
    rope_interpolation_factor: float | None = None
    """--rotary-seq-len-interpolation-factor: RoPE's linear position interpolation (positions
    divided by the factor before rotating; Hugging Face's ``linear`` RoPE scaling); None: none."""
    norm_epsilon: float = 1e-5
    """--norm-epsilon: the norms' epsilon."""
    init_method_std: float = 0.02
    """--init-method-std: std of the normal weight initialisation."""
    normalization: str = "RMSNorm"
    """--normalization: RMSNorm (Llama) or LayerNorm (GPT-3, Megatron-LM's default)."""
    activation: str = "swiglu"
    """The MLP: swiglu (--swiglu: SiLU-gated, Llama), or one up projection with gelu (GPT-3,
    Megatron-LM's default: exact GeLU), openai_gelu (--openai-gelu: GeLU's tanh approximation,
    GPT-2's ``gelu_new``) or squared_relu (--squared-relu: relu(x)^2, Nemotron's)."""
    position_embedding_type: str = "rope"
    """--position-embedding-type: rope (Llama) or learned_absolute (GPT-3, Megatron-LM's default:
    a learned table of --max-position-embeddings rows, which also bounds the sequence length)."""
    add_bias_linear: bool = False
    """Biases in every linear layer (GPT-3, Megatron-LM's default; --disable-bias-linear: none)."""
    tied_embeddings: bool = False
    """The output layer uses the input embedding's weight (GPT-3, Megatron-LM's default;
    --untie-embeddings-and-output-weights: separate weights)."""
    qk_layernorm: bool = False
    """--qk-layernorm: the query and key of each head normalised (the norm above, over the head
    size) before RoPE, as in Qwen3 and OLMo 2."""
    add_qkv_bias: bool = False
    """--add-qkv-bias: biases on the query, key and value projections only (Qwen2's), where
    ``add_bias_linear`` is off."""
    apply_layernorm_1p: bool = False
    """--apply-layernorm-1p: the norms' weights are stored zero-centred and applied as
    ``weight + 1`` (megatron-core's ``layernorm_zero_centered_gamma``; Nemotron's), so weight
    decay pulls them towards 1."""
    rotary_percent: float = 1.0
    """--rotary-percent: the share of each head's channels RoPE rotates (the first ones; the rest
    pass unrotated; Nemotron's 0.5)."""
    window_size: int | None = None
    """--window-size L,0: sliding-window attention, each token attending to itself and the L
    tokens before it (Megatron-LM's (left, right) window, causal: right 0; Mistral's
    ``sliding_window`` W is L = W - 1); None: full causal attention."""
    longrope: LongRope | None = None
    """LongRoPE (Phi-3.5, Phi-4-mini: :class:`LongRope`); None: none."""
    yarn: Yarn | None = None
    """YaRN (--position-embedding-type yarn; Qwen's long-context setting: :class:`Yarn`); None:
    none."""
    num_experts: int | None = None
    """--num-experts: every layer's MLP is a mixture of this many experts (megatron-core's
    ``MoELayer``: a linear router, top-k experts per token, each an MLP of the model's kind);
    None: a dense MLP."""
    moe_router_topk: int = 2
    """--moe-router-topk: experts each token is routed to."""
    moe_ffn_hidden_size: int | None = None
    """--moe-ffn-hidden-size: each expert's inner width (None: --ffn-hidden-size)."""
    moe_router_pre_softmax: bool = False
    """--moe-router-pre-softmax: the top-k weights are the softmax over all experts (else, as
    Mixtral's, a softmax over the k chosen logits)."""
    moe_layer_freq: tuple[int, ...] | None = None
    """--moe-layer-freq: which layers have a mixture (1) and which a dense MLP of
    --ffn-hidden-size (0), one entry per layer; given as Megatron-LM's N (layers 0, N, 2N, ...)
    or its pattern (``[0]+[1]*23``), recorded as the pattern; None: every layer."""
    moe_shared_expert_intermediate_size: int | None = None
    """--moe-shared-expert-intermediate-size: a shared expert beside the routed ones in every
    mixture, an MLP of this width that every token runs (Qwen-MoE's, DeepSeek's); None: none."""
    moe_shared_expert_gate: bool = False
    """--moe-shared-expert-gate: the shared expert's output scaled by sigmoid(w . x), a learned
    per-token gate (Qwen2-MoE's ``shared_expert_gate``)."""
    moe_router_score_function: str = "softmax"
    """--moe-router-score-function: softmax, or sigmoid (DeepSeek-V3's: each expert's score
    sigmoid(logit), the chosen ones' weights their scores over their sum)."""
    moe_router_topk_scaling_factor: float | None = None
    """--moe-router-topk-scaling-factor: the chosen experts' weights multiplied by it (DeepSeek's
    routed scaling factor); None: 1."""
    moe_router_num_groups: int | None = None
    """--moe-router-num-groups: group-limited routing (DeepSeek's device- and node-limited
    routing): the experts in this many equal groups, a token's top-k drawn from the
    --moe-router-group-topk groups whose best top-k / group-topk scores sum highest."""
    moe_router_group_topk: int | None = None
    """--moe-router-group-topk: the groups a token's experts come from (with
    --moe-router-num-groups)."""
    moe_router_enable_expert_bias: bool = False
    """--moe-router-enable-expert-bias: auxiliary-loss-free load balancing (DeepSeek-V3's): a
    per-expert bias added to the scores when choosing (not weighing) the experts, moved each
    step by --moe-router-bias-update-rate towards the balance; sigmoid scores only."""

    def __post_init__(self):
        for name in (*SHAPE_FIELDS, "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.kv_channels is not None and self.kv_channels <= 0:
            raise ConfigError("--kv-channels must be positive")
        if self.kv_channels is not None and self.kv_channels * self.num_attention_heads == (
            self.hidden_size
        ):
            object.__setattr__(self, "kv_channels", None)  # the default, recorded as such
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--num-attention-heads {self.num_attention_heads} does not divide "
                f"--hidden-size {self.hidden_size}; give the head size with --kv-channels"
            )
        if self.rope_scaling_factor is not None and self.rope_scaling_factor <= 0:
            raise ConfigError("--rope-scaling-factor must be positive")
        if self.rope_scaling_factor is not None and self.position_embedding_type != "rope":
            raise ConfigError(
                "--use-rope-scaling needs --position-embedding-type rope, not "
                f"{self.position_embedding_type}"
            )
        rotated = self.head_dim * self.rotary_percent
        if not 0 < self.rotary_percent <= 1 or rotated != int(rotated) or int(rotated) % 2:
            raise ConfigError(
                f"--rotary-percent {self.rotary_percent:g} must be in (0, 1] and rotate an even "
                f"number of each head's {self.head_dim} channels"
            )
        if self.rotary_percent != 1.0 and self.position_embedding_type != "rope":
            raise ConfigError(
                f"--rotary-percent {self.rotary_percent:g} applies to --position-embedding-type "
                "rope"
            )
        if self.window_size is not None and self.window_size < 1:
            raise ConfigError(f"--window-size {self.window_size},0: the window must be >= 1")
        if self.num_experts is not None:
            self._check_experts()
        elif self.moe_layer_freq is not None or self.moe_shared_expert_intermediate_size:
            raise ConfigError(
                "--moe-layer-freq and --moe-shared-expert-intermediate-size need --num-experts"
            )
        if isinstance(self.longrope, dict):  # a checkpoint's JSON record
            object.__setattr__(self, "longrope", LongRope(**self.longrope))
        if self.longrope is not None:
            self._check_longrope(int(rotated))
        if isinstance(self.yarn, dict):  # a checkpoint's JSON record
            object.__setattr__(self, "yarn", Yarn(**self.yarn))
        if self.yarn is not None:
            self._check_yarn()
        factor = self.rope_interpolation_factor
        if factor is not None and (factor <= 0 or self.position_embedding_type != "rope"):
            raise ConfigError(
                "--rotary-seq-len-interpolation-factor must be positive, with "
                f"--position-embedding-type rope (got {factor:g} with "
                f"{self.position_embedding_type})"
            )
        for name, choices in (("normalization", NORMALIZATIONS), ("activation", ACTIVATIONS),
                              ("position_embedding_type", POSITION_EMBEDDINGS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got "
                    f"{getattr(self, name)!r}"
                )
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"--num-query-groups {self.num_query_groups} does not divide "
                f"--num-attention-heads {self.num_attention_heads}"
            )

    def _check_experts(self) -> None:
        if self.num_experts < 2:
            raise ConfigError(f"--num-experts {self.num_experts}: a mixture needs >= 2 experts")
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ConfigError(
                f"--moe-router-topk {self.moe_router_topk} must be in 1..--num-experts "
                f"{self.num_experts}"
            )
        if self.moe_ffn_hidden_size is not None and self.moe_ffn_hidden_size < 1:
            raise ConfigError("--moe-ffn-hidden-size must be positive")
        object.__setattr__(
            self, "moe_layer_freq", moe_layer_pattern(self.moe_layer_freq, self.num_layers)
        )
        shared = self.moe_shared_expert_intermediate_size
        if shared is not None and shared < 1:
            raise ConfigError("--moe-shared-expert-intermediate-size must be positive")
        if self.moe_shared_expert_gate and shared is None:
            raise ConfigError(
                "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size"
            )
        self._check_router()
        if self.add_bias_linear:  # (megatron-core 0.16's biased experts fail in the forward)
            raise ConfigError(
                f"--num-experts {self.num_experts} needs --disable-bias-linear: the experts "
                "take no linear biases"
            )

    def _check_router(self) -> None:
        """The router's choices, as megatron-core checks them (each named by its flag)."""
        sigmoid = self.moe_router_score_function == "sigmoid"
        if self.moe_router_score_function not in ROUTER_SCORE_FUNCTIONS:
            raise ConfigError(
                f"--moe-router-score-function must be one of {', '.join(ROUTER_SCORE_FUNCTIONS)}"
                f", got {self.moe_router_score_function!r}"
            )
        if sigmoid and self.moe_router_pre_softmax:
            raise ConfigError("--moe-router-pre-softmax applies to the softmax score function")
        if self.moe_router_topk == 1 and not sigmoid and not self.moe_router_pre_softmax:
            raise ConfigError(  # (a softmax over one logit has no gradient)
                "--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core's rule)"
            )
        if self.moe_router_enable_expert_bias and not sigmoid:
            raise ConfigError(
                "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"
            )
        factor = self.moe_router_topk_scaling_factor
        if factor is not None and factor <= 0:
            raise ConfigError("--moe-router-topk-scaling-factor must be positive")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ConfigError(
                "--moe-router-num-groups and --moe-router-group-topk go together (group-limited "
                "routing)"
            )
        if groups is not None and (
            groups < 1
            or self.num_experts % groups
            or not 1 <= group_topk <= groups
            or self.moe_router_topk % group_topk
            or self.moe_router_topk // group_topk > self.num_experts // groups
        ):
            raise ConfigError(
                f"--moe-router-num-groups {groups} must divide --num-experts {self.num_experts}, "
                f"and --moe-router-group-topk {group_topk} be in 1..{groups} and divide "
                f"--moe-router-topk {self.moe_router_topk} into at most the experts of a group"
            )

    @property
    def mixture(self) -> bool:
        """The MLPs are mixtures of experts (--num-experts; in the layers --moe-layer-freq
        names)."""
        return self.num_experts is not None

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """For each layer: its MLP is a mixture of experts."""
        if not self.mixture:
            return (False,) * self.num_layers
        return tuple(bool(x) for x in self.moe_layer_freq or (1,) * self.num_layers)

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Each expert's inner width (the dense MLP's without --moe-ffn-hidden-size)."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def _check_yarn(self) -> None:
        if self.position_embedding_type != "rope":
            raise ConfigError(
                "YaRN scales RoPE: --position-embedding-type learned_absolute has none"
            )
        other = (self.longrope is not None, self.rope_scaling_factor is not None,
                 self.rope_interpolation_factor is not None)  # fmt: skip
        if any(other):
            raise ConfigError(
                "YaRN replaces LongRoPE, --use-rope-scaling and "
                "--rotary-seq-len-interpolation-factor: give one scaling of RoPE"
            )

    def _check_longrope(self, rotated: int) -> None:
        lr = self.longrope
        if self.position_embedding_type != "rope":
            raise ConfigError("LongRoPE needs --position-embedding-type rope")
        if self.rope_scaling_factor is not None or self.rope_interpolation_factor is not None:
            raise ConfigError(
                "LongRoPE replaces --use-rope-scaling and --rotary-seq-len-interpolation-factor"
            )
        if len(lr.short_factor) != rotated // 2 or len(lr.long_factor) != rotated // 2:
            raise ConfigError(
                f"LongRoPE: {len(lr.short_factor)} short and {len(lr.long_factor)} long factors "
                f"for {rotated // 2} rotated frequencies (--kv-channels {self.head_dim}, "
                f"--rotary-percent {self.rotary_percent:g})"
            )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def replace(self, **overrides) -> GPTModelConfig:
        """A copy with explicit flags overriding the preset (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def kind(self) -> dict:
        """The architecture's kind: its :data:`KIND_FIELDS` and their values."""
        return {name: getattr(self, name) for name in KIND_FIELDS}

    @property
    def is_llama(self) -> bool:
        """Llama's architecture (what Hugging Face conversion and the tiny-LM tools handle)."""
        return self.kind == LLAMA_KIND

    @property
    def biases(self) -> str:
        """Which linear layers have biases: ``all``, ``qkv`` (Qwen2's) or ``none``."""
        return "all" if self.add_bias_linear else "qkv" if self.add_qkv_bias else "none"

    @property
    def gated(self) -> bool:
        """The MLP's first projection is ``[gate; up]`` (SwiGLU)."""
        return self.activation == "swiglu"

    def num_parameters(self, padded_vocab_size: int | None = None) -> int:
        """Exact parameter count."""
        vocab = padded_vocab_size or self.vocab_size
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.num_query_groups * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h  # q, k, v, o
        matrices = 3 if self.gated else 2  # (gate,) up, down
        dense = matrices * h * f
        if self.add_bias_linear:  # (a mixture has none)
            dense += (2 * f if self.gated else f) + h
        norm = 2 * h if self.normalization == "LayerNorm" else h  # weight (and bias)
        if self.add_bias_linear:
            attention += q + 2 * kv + h
        elif self.add_qkv_bias:
            attention += q + 2 * kv
        if self.qk_layernorm:  # one norm for the query heads, one for the key heads
            attention += 2 * norm // h * self.head_dim
        mlps = sum(self._moe_mlp_parameters() if moe else dense for moe in self.moe_layers)
        embeddings = (1 if self.tied_embeddings else 2) * vocab * h
        if self.position_embedding_type == "learned_absolute":
            embeddings += self.max_position_embeddings * h
        # + the final norm
        return self.num_layers * (attention + 2 * norm) + mlps + norm + embeddings

    def _moe_mlp_parameters(self) -> int:
        """One mixture: the experts, the router (megatron-core's has no bias), the shared
        expert and its gate."""
        h, matrices = self.hidden_size, 3 if self.gated else 2
        n = self.num_experts * (matrices * h * self.expert_ffn_hidden_size + h)
        if self.moe_shared_expert_intermediate_size:
            n += matrices * h * self.moe_shared_expert_intermediate_size
            n += h if self.moe_shared_expert_gate else 0
        return n

    def kind_name(self) -> str:
        """Llama, GPT-3, or the choices of a mixed architecture."""
        if self.is_llama:
            return "Llama"
        if self.kind == GPT3_KIND:
            return "GPT-3"
        if self.kind == {**GPT3_KIND, "activation": "openai_gelu"}:
            return "GPT-2"  # (GPT-2's tanh GeLU is GPT-3's only difference here)
        if self.kind == NEMOTRON_KIND:
            return "Nemotron"
        return "custom"

    def describe_kind(self) -> str:
        """``GPT-3 architecture (LayerNorm, GeLU, learned positions, biases, tied embeddings)``."""
        if self.position_embedding_type == "rope":
            positions = f"RoPE base {self.rotary_base:g}"
            if self.rotary_percent != 1.0:
                positions += f" on {self.rotary_percent:.0%} of each head"
            if self.rope_scaling_factor:
                positions += f" scaled x{self.rope_scaling_factor:g}"
            if self.rope_interpolation_factor:
                positions += f", positions / {self.rope_interpolation_factor:g}"
            if self.yarn:
                positions += (
                    f", YaRN x{self.yarn.factor:g} beyond {self.yarn.original_max_positions} "
                    f"positions (attention x{self.yarn.attention_factor:.4g})"
                )
            if self.longrope:
                positions += (
                    f", LongRoPE (long factors beyond {self.longrope.original_max_positions} "
                    f"positions, attention x{self.longrope.attention_factor:.4g})"
                )
        else:
            positions = "learned positions"
        if self.window_size is not None:
            positions += f", sliding window of {self.window_size + 1}"
        choices = ", ".join(
            [
                self.normalization + (" 1p" if self.apply_layernorm_1p else ""),
                ACTIVATIONS[self.activation],
                positions,
                {"all": "biases", "qkv": "QKV biases", "none": "no biases"}[self.biases],
                "tied embeddings" if self.tied_embeddings else "untied embeddings",
                *(["QK norm"] if self.qk_layernorm else []),
                *([self._describe_mixture()] if self.num_experts else []),
            ]
        )
        return f"{self.kind_name()} architecture ({choices})"

    def _describe_mixture(self) -> str:
        text = f"{self.num_experts} experts, top-{self.moe_router_topk}"
        if self.moe_shared_expert_intermediate_size:
            gate = "a gated" if self.moe_shared_expert_gate else "a"
            text += f", {gate} shared expert of {self.moe_shared_expert_intermediate_size}"
        if self.moe_router_score_function == "sigmoid":
            text += ", sigmoid router" + (" with expert bias" if self.moe_router_enable_expert_bias
                                          else "")  # fmt: skip
        if self.moe_router_num_groups:
            text += f" in {self.moe_router_group_topk} of {self.moe_router_num_groups} groups"
        if self.moe_router_topk_scaling_factor:
            text += f" scaled x{self.moe_router_topk_scaling_factor:g}"
        if self.moe_layer_freq:
            text += f", in {sum(self.moe_layers)} of {self.num_layers} layers"
        return text

    def _describe_ffn(self) -> str:
        if not self.mixture:
            return str(self.ffn_hidden_size)
        if all(self.moe_layers):
            return f"{self.expert_ffn_hidden_size} per expert"
        return f"{self.ffn_hidden_size} dense, {self.expert_ffn_hidden_size} per expert"

    def describe(self, padded_vocab_size: int) -> str:
        """One line for the log: the architecture, its shape and its parameter count."""
        return (
            f"{self.describe_kind()}: "
            f"{self.num_layers} layers, hidden {self.hidden_size}, {self.num_attention_heads} "
            f"heads{f' of {self.kv_channels}' if self.kv_channels else ''} in "
            f"{self.num_query_groups} KV groups, FFN {self._describe_ffn()}, vocabulary "
            f"{self.vocab_size} padded to {padded_vocab_size}: "
            f"{self.num_parameters(padded_vocab_size):,} parameters"
        )

    def flops_per_token(self, seq_length: int, mtp_layers: int = 0) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), matmuls and attention;
        with ``mtp_layers`` multi-token prediction heads (each: a projection from 2h, a layer
        like the last one, its logits)."""
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        q = self.num_attention_heads * self.head_dim
        mlp_matrices = 3 if self.gated else 2
        mlp = mlp_matrices * h * self.ffn_hidden_size
        # a mixture: the k experts a token is routed to, the router, the shared expert
        moe = (
            h * (self.num_experts or 0)
            + mlp_matrices
            * h
            * (
                self.moe_router_topk * self.expert_ffn_hidden_size
                + (self.moe_shared_expert_intermediate_size or 0)
            )
            + (h if self.moe_shared_expert_gate else 0)
        )

        def layer(is_moe: bool) -> float:  # its matmuls
            return 2 * (2 * h * q + 2 * h * kv + (moe if is_moe else mlp))

        matmuls = sum(layer(is_moe) for is_moe in self.moe_layers)
        attention = 2 * 2 * seq_length * q / 2  # causal: half of QK^T and AV
        logits = 2 * h * self.vocab_size
        head = 2 * 2 * h * h + layer(self.moe_layers[-1]) + attention + logits
        return 3 * (matmuls + self.num_layers * attention + logits + mtp_layers * head)


PRESETS: dict[str, GPTModelConfig] = {
    # Tests and the quickstart: a few hundred thousand parameters, fast on one CPU core.
    "tiny": GPTModelConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=176,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
        max_position_embeddings=256,
    ),
    # TinyLlama-1.1B (Rho-1's 1B base): 1,100,048,384 parameters.
    "tinyllama-1.1b": GPTModelConfig(
        num_layers=22,
        hidden_size=2048,
        ffn_hidden_size=5632,
        num_attention_heads=32,
        num_query_groups=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    # Mistral-7B-v0.1 (Rho-1's 7B base): 7,241,732,096 parameters. Mistral attends within a
    # sliding window of 4096 tokens; the preset builds full causal attention, which is the same
    # for sequences of up to 4096 tokens (Rho-1 trains at 2048); --window-size 4095,0 (or the
    # imported Hugging Face model, which records it) attends as Mistral beyond.
    "mistral-7b": GPTModelConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        rotary_base=10000.0,
    ),
    # PanGu-pi-1B Pro: width 1792, 14 heads (MHA), FFN ratio 8/3 rounded up to a multiple of 256
    # (4778.7 -> 4864), compact 48k tokenizer, sequence 2048. The paper's table lists 21 layers,
    # its released config 20; we follow the released config, because parameter inheritance and
    # comparisons are made against the checkpoint people can actually load.
    "pangu-pi-1b-pro": GPTModelConfig(
        num_layers=20,
        hidden_size=1792,
        ffn_hidden_size=4864,
        num_attention_heads=14,
        num_query_groups=14,
        vocab_size=48000,
        max_position_embeddings=2048,
    ),
    # PanGu-pi-1.5B Pro: 1,500,080,128 parameters, the "1.5" (billion) of the paper's Figure 1
    # (arXiv 2402.02791; fig/improve.png in YuchuanTian/RethinkTinyLM). Width 2048, depth 22 and
    # the 48k compact vocabulary are the paper's configuration table (fig/configure.png there).
    # Not published: heads and FFN size. Heads: 16, the 1B Pro's head size of 128
    # (configs/LLM1B.py: 1792 / 14). FFN: the 1B Pro's 8/3 ratio (-> 5632) would give 1.33B,
    # which contradicts the figure, so we take the multiple of 256 whose total is 1.5B: 6912.
    "pangu-pi-1.5b-pro": GPTModelConfig(
        num_layers=22,
        hidden_size=2048,
        ffn_hidden_size=6912,
        num_attention_heads=16,
        num_query_groups=16,
        vocab_size=48000,
        max_position_embeddings=2048,
    ),
}


def moe_layer_pattern(freq, num_layers: int) -> tuple[int, ...] | None:
    """--moe-layer-freq as one entry per layer (1: a mixture), None when every layer has one.
    ``freq``: Megatron-LM's N (a mixture in layers 0, N, 2N, ...: megatron-core's reading), a
    pattern (a checkpoint's JSON list), or None."""
    if freq is None:
        return None
    if isinstance(freq, int) and not isinstance(freq, bool):
        if freq < 1:
            raise ConfigError(f"--moe-layer-freq {freq} must be >= 1")
        freq = [int(i % freq == 0) for i in range(num_layers)]
    pattern = tuple(freq)
    if len(pattern) != num_layers or any(x not in (0, 1) for x in pattern) or 1 not in pattern:
        raise ConfigError(
            f"--moe-layer-freq {list(pattern)}: one 0 (dense) or 1 (mixture of experts) per "
            f"layer, {num_layers} in all, at least one 1"
        )
    return None if 0 not in pattern else tuple(int(x) for x in pattern)


def get_preset(name: str) -> GPTModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"--model-preset {name!r} is unknown; choose one of {', '.join(sorted(PRESETS))}"
        ) from None


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron-LM's padding: a multiple of ``--make-vocab-size-divisible-by`` x TP."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


FIRST_STAGE_FLAG = "--decoder-first-pipeline-num-layers"
LAST_STAGE_FLAG = "--decoder-last-pipeline-num-layers"


def pipeline_stage_layers(
    num_layers: int, pipeline_parallel_size: int, first: int | None = None,
    last: int | None = None,
) -> tuple[int, ...]:  # fmt: skip
    """The layers of each pipeline stage: an even split, or Megatron-LM's uneven one (``first``
    and/or ``last`` stage given, the stages between sharing the rest evenly), checked as
    megatron-core checks it."""
    pp = pipeline_parallel_size
    if first is None and last is None:
        if num_layers % pp:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} does not divide --num-layers {num_layers}"
                f" (or set the first or last stage's layers: {FIRST_STAGE_FLAG}, "
                f"{LAST_STAGE_FLAG})"
            )
        return (num_layers // pp,) * pp
    given = [(flag, n) for flag, n in ((FIRST_STAGE_FLAG, first), (LAST_STAGE_FLAG, last))
             if n is not None]  # fmt: skip
    if pp < 2:
        raise ConfigError(f"{given[0][0]} needs --pipeline-model-parallel-size > 1")
    for flag, n in given:
        if n < 1:
            raise ConfigError(f"{flag} must be >= 1, got {n}")
    middle_stages = pp - len(given)
    middle_layers = num_layers - sum(n for _, n in given)
    if (
        middle_layers < 0
        or bool(middle_layers) != bool(middle_stages)
        or (middle_stages and middle_layers % middle_stages)
    ):
        named = " and ".join(f"{flag} {n}" for flag, n in given)
        raise ConfigError(
            f"--num-layers {num_layers} less {named} leaves {middle_layers} layers for the "
            f"{middle_stages} pipeline stages between: they must split evenly, at least one "
            "layer each"
        )
    middle = (middle_layers // middle_stages,) * middle_stages if middle_stages else ()
    return (() if first is None else (first,)) + middle + (() if last is None else (last,))


def virtual_pipeline_size(
    num_layers: int,
    pipeline_parallel_size: int,
    num_layers_per_virtual_pipeline_stage: int | None = None,
    virtual_stages: int | None = None,
) -> int | None:
    """megatron-core's ``virtual_pipeline_model_parallel_size`` for the flags (None: the
    non-interleaved schedule; one virtual stage per rank is none, as in Megatron-LM)."""
    if virtual_stages is not None:
        return virtual_stages if virtual_stages > 1 else None
    if num_layers_per_virtual_pipeline_stage:
        return num_layers // pipeline_parallel_size // num_layers_per_virtual_pipeline_stage
    return None


def _check_virtual_stages(stages: tuple[int, ...], virtual_stages: int) -> None:
    """Each pipeline stage's layers (``stages``) split into ``virtual_stages`` chunks."""
    flag = f"--num-virtual-stages-per-pipeline-rank {virtual_stages}"
    if virtual_stages < 1:
        raise ConfigError(f"{flag} must be >= 1")
    if virtual_stages > 1 and len(stages) < 2:
        raise ConfigError(f"{flag} needs --pipeline-model-parallel-size > 1")
    for rank, layers in enumerate(stages):
        if layers % virtual_stages:
            raise ConfigError(
                f"{flag} does not divide the {layers} layers of pipeline stage {rank}: each "
                "stage's layers split evenly into its virtual stages"
            )


def check_parallel_layout(
    model: GPTModelConfig,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    num_layers_per_virtual_pipeline_stage: int | None = None,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    virtual_stages: int | None = None,
    expert_tensor_parallel_size: int | None = None,
    layout: str | None = None,
    mtp_num_layers: int | None = None,
) -> None:
    """Raise a ValueError naming the flag when the model cannot be split this way.
    ``expert_tensor_parallel_size``: the experts' TP size (None: ``tensor_parallel_size``).
    ``layout``: --pipeline-model-parallel-layout, which replaces the stage flags (checked with
    the model's layers and its ``mtp_num_layers`` heads).
    ``virtual_stages``: --num-virtual-stages-per-pipeline-rank (exclusive with
    ``num_layers_per_virtual_pipeline_stage``; each stage's layers, uneven ones too, split
    evenly into that many chunks, megatron-core's rule)."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError(
            "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1"
        )
    for size, name in (
        (model.num_attention_heads, "--num-attention-heads"),
        (model.num_query_groups, "--num-query-groups"),
        (model.ffn_hidden_size, "--ffn-hidden-size"),
        *(
            ((model.moe_shared_expert_intermediate_size, "--moe-shared-expert-intermediate-size"),)
            if model.moe_shared_expert_intermediate_size
            else ()
        ),
    ):
        if size % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide {name} {size}")
    etp = expert_tensor_parallel_size or tp
    if model.num_experts and model.expert_ffn_hidden_size % etp:
        flag = (
            "--tensor-model-parallel-size"
            if expert_tensor_parallel_size in (None, tp)
            else "--expert-tensor-parallel-size"
        )
        raise ConfigError(
            f"{flag} {etp} does not divide --moe-ffn-hidden-size {model.expert_ffn_hidden_size}"
        )
    if layout is not None:
        parse_pipeline_layout(layout, pp, model.num_layers, mtp_num_layers)
        return
    stages = pipeline_stage_layers(model.num_layers, pp, first_stage_layers, last_stage_layers)
    vstage = num_layers_per_virtual_pipeline_stage
    uneven = first_stage_layers is not None or last_stage_layers is not None
    if vstage is not None and virtual_stages is not None:
        raise ConfigError(
            "give either --num-layers-per-virtual-pipeline-stage or "
            "--num-virtual-stages-per-pipeline-rank, not both"
        )
    if virtual_stages is not None:
        _check_virtual_stages(stages, virtual_stages)
    if vstage is not None and uneven:
        raise ConfigError(
            f"{FIRST_STAGE_FLAG} and {LAST_STAGE_FLAG} are not supported with "
            "--num-layers-per-virtual-pipeline-stage: give --num-virtual-stages-per-pipeline-rank "
            "(Megatron-LM's rule)"
        )
    if vstage is not None:
        if pp < 2:
            raise ConfigError(
                "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"
            )
        if vstage < 1 or (model.num_layers // pp) % vstage:
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage {vstage} does not divide the "
                f"{model.num_layers // pp} layers of each pipeline stage"
            )
