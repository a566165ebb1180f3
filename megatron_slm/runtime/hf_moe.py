"""Hugging Face's mixtures of experts as megatron-core's, both ways: Mixtral, Qwen2-MoE, Qwen3-MoE,
GLM-4.5.

All are Llama's design with some MLPs replaced by a router over SwiGLU experts. Their tensors here
carry Qwen-MoE's names: ``mlp.gate`` (the router), ``mlp.experts.E.{gate,up,down}_proj``, and
Qwen2-MoE's ``mlp.shared_expert.*`` with its ``mlp.shared_expert_gate``. :class:`RenamedWeights`
shows a Mixtral directory's ``block_sparse_moe.{gate, experts.E.w1/w3/w2}`` under those names (w1
the gate, w3 the up projection, w2 the down projection) and a GLM-4.5 directory's
``mlp.shared_experts.*`` as ``mlp.shared_expert.*`` (its multi-token-prediction layers, beyond
``num_hidden_layers``, hidden); :func:`mixtral_names` and :func:`glm_names` rename an export back.

Routing: Mixtral's and a Qwen-MoE with ``norm_topk_prob`` weigh the k chosen experts by the softmax
over their logits (megatron-core's router without pre-softmax); a Qwen-MoE without it by the
softmax over all experts, unrenormalised (``--moe-router-pre-softmax``). Qwen-MoE layer ``i``
has a mixture unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step`` is not 0
(the others a dense MLP of ``intermediate_size``: ``--moe-layer-freq``). GLM-4.5's is DeepSeek-V3's:
sigmoid scores, ``e_score_correction_bias`` (the expert bias) choosing, ``n_group`` groups of which
``topk_group`` are kept by the sum of their best two scores, the chosen scores renormalised and
multiplied by ``routed_scaling_factor``; ``n_shared_experts`` experts' worth of an ungated shared
expert; the first ``first_k_dense_replace`` layers dense.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from megatron_slm.errors import ConfigError

MIXTRAL = "MixtralForCausalLM"
QWEN2_MOE = "Qwen2MoeForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
GLM4_MOE = "Glm4MoeForCausalLM"
MOE_ARCHITECTURES = {MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", QWEN3_MOE: "qwen3_moe",
                     GLM4_MOE: "glm4_moe"}  # fmt: skip
"""Architecture -> ``model_type``."""
_MIXTRAL_NAME = re.compile(
    r"(model\.layers\.\d+\.)block_sparse_moe\.(gate|experts\.\d+\.w[123])\.weight"
)
_MIXTRAL_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_QWEN_NAME = re.compile(
    r"(model\.layers\.\d+\.)mlp\.(gate|experts\.\d+\.(gate|up|down)_proj)\.weight"
)
_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def _qwen_suffix(mixtral_suffix: str) -> str:
    if mixtral_suffix == "gate":
        return "gate"
    head, _, w = mixtral_suffix.rpartition(".")
    return f"{head}.{_MIXTRAL_PARTS[w]}"


def _mixtral_suffix(qwen_suffix: str) -> str:
    if qwen_suffix == "gate":
        return "gate"
    head, _, part = qwen_suffix.rpartition(".")
    return f"{head}.{ {v: k for k, v in _MIXTRAL_PARTS.items()}[part] }"


def _from_mixtral(name: str) -> str:
    m = _MIXTRAL_NAME.fullmatch(name)
    return f"{m.group(1)}mlp.{_qwen_suffix(m.group(2))}.weight" if m else name


def _from_glm(num_layers: int) -> Callable[[str], str | None]:
    def canonical(name: str) -> str | None:
        m = _LAYER_INDEX.match(name)
        if m and int(m.group(1)) >= num_layers:
            return None  # a multi-token-prediction layer (num_nextn_predict_layers)
        return name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")

    return canonical


class RenamedWeights:
    """An ``HFWeights`` whose tensors show under the names ``canonical`` gives them (None:
    hidden): a Mixtral or GLM-4.5 directory as Qwen-MoE's names; ``original`` names a canonical
    tensor as the directory would (for messages about a missing one)."""

    def __init__(self, weights, canonical: Callable[[str], str | None], original):
        self._weights, self.path, self.source_name = weights, weights.path, original
        self._source = {c: n for n in weights.names() if (c := canonical(n)) is not None}

    def names(self) -> list[str]:
        return list(self._source)

    def __contains__(self, name: str) -> bool:
        return name in self._source

    def shape(self, name: str) -> tuple[int, ...]:
        return self._weights.shape(self._source[name])

    def get(self, name: str) -> torch.Tensor:
        return self._weights.get(self._source[name])

    def location(self, name: str) -> str:
        return self._weights.location(self._source[name])


def moe_weights(weights, arch: str, num_layers: int):
    """``weights`` under Qwen-MoE's names (Mixtral's and GLM-4.5's renamed; others as they are)."""
    if arch == MIXTRAL:
        return RenamedWeights(weights, _from_mixtral, _to_mixtral)
    if arch == GLM4_MOE:
        return RenamedWeights(weights, _from_glm(num_layers), _to_glm)
    return weights


def _to_mixtral(name: str) -> str:
    m = _QWEN_NAME.fullmatch(name)
    return f"{m.group(1)}block_sparse_moe.{_mixtral_suffix(m.group(2))}.weight" if m else name


def _to_glm(name: str) -> str:
    return name.replace(".mlp.shared_expert.", ".mlp.shared_experts.")


def mixtral_names(
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Export tensors under Qwen-MoE's names -> Mixtral's."""
    return ((_to_mixtral(name), tensor) for name, tensor in tensors)


def glm_names(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Export tensors under Qwen-MoE's names -> GLM-4.5's (its shared expert is plural)."""
    return ((_to_glm(name), tensor) for name, tensor in tensors)


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def moe_choices(cfg: dict, arch: str) -> dict:
    """The mixture fields of a ``GPTModelConfig`` from a Mixtral or Qwen-MoE config."""
    if arch == MIXTRAL:
        return {"num_experts": cfg["num_local_experts"],
                "moe_router_topk": cfg["num_experts_per_tok"]}  # fmt: skip
    if arch == GLM4_MOE:
        return _glm_choices(cfg)
    layers = cfg["num_hidden_layers"]
    dense = set(cfg.get("mlp_only_layers") or ())
    step = cfg.get("decoder_sparse_step", 1) or 1
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    choices = {
        # (transformers 5 writes Qwen3-MoE's as num_local_experts, reading either)
        "num_experts": cfg.get("num_experts") or cfg["num_local_experts"],
        "moe_router_topk": cfg["num_experts_per_tok"],
        "moe_ffn_hidden_size": cfg["moe_intermediate_size"],
        "moe_router_pre_softmax": not cfg.get("norm_topk_prob", False),  # (transformers' default)
        "moe_layer_freq": pattern,
    }
    if arch == QWEN2_MOE and cfg.get("shared_expert_intermediate_size"):
        choices.update(moe_shared_expert_intermediate_size=cfg["shared_expert_intermediate_size"],
                       moe_shared_expert_gate=True)  # fmt: skip
    return choices


def _glm_choices(cfg: dict) -> dict:
    """GLM-4.5's (DeepSeek-V3's) mixture: see the module's docstring."""
    experts, topk = (
        cfg.get("n_routed_experts") or cfg["num_local_experts"],
        cfg["num_experts_per_tok"],
    )
    if not cfg.get("norm_topk_prob", True) and topk > 1:
        raise ConfigError("norm_topk_prob=false is not supported (megatron-core renormalises)")
    groups, group_topk = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    if groups > 1 and topk // group_topk != 2:  # (megatron-core sums a group's top k/groups)
        raise ConfigError(
            f"n_group {groups} with num_experts_per_tok {topk} and topk_group {group_topk}: "
            "megatron-core ranks groups by their best top-k / topk_group scores, GLM by their "
            "best two (supported where those agree)"
        )
    dense = cfg.get("first_k_dense_replace", 0) or 0
    shared = (cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"]
    factor = cfg.get("routed_scaling_factor", 1.0)
    return {
        "num_experts": experts,
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": cfg["moe_intermediate_size"],
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": None if factor == 1.0 else float(factor),
        "moe_router_num_groups": groups if groups > 1 else None,
        "moe_router_group_topk": group_topk if groups > 1 else None,
        "moe_shared_expert_intermediate_size": shared or None,
        "moe_layer_freq": [int(i >= dense) for i in range(cfg["num_hidden_layers"])],
    }


def _glm_hf_config(model) -> dict:
    shared, f = model.moe_shared_expert_intermediate_size or 0, model.expert_ffn_hidden_size
    dense = model.moe_layers.index(True)
    if shared % f:
        raise ConfigError(
            f"Glm4MoeForCausalLM holds a shared expert of n x --moe-ffn-hidden-size {f}, not "
            f"{shared} wide"
        )
    if not all(model.moe_layers[dense:]):
        raise ConfigError(
            "Glm4MoeForCausalLM has its dense layers first only, not "
            f"--moe-layer-freq {list(map(int, model.moe_layers))}"
        )
    groups = model.moe_router_num_groups
    if groups and model.moe_router_topk // model.moe_router_group_topk != 2:
        raise ConfigError(
            "Glm4MoeForCausalLM ranks groups by their best two scores: --moe-router-topk over "
            "--moe-router-group-topk must be 2"
        )
    return {
        "n_routed_experts": model.num_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "moe_intermediate_size": f,
        "n_shared_experts": shared // f,
        "routed_scaling_factor": model.moe_router_topk_scaling_factor or 1.0,
        "n_group": groups or 1,
        "topk_group": model.moe_router_group_topk or 1,
        "first_k_dense_replace": dense,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "use_qk_norm": model.qk_layernorm,
        "attention_bias": model.add_qkv_bias,
        "partial_rotary_factor": model.rotary_percent,
    }


def moe_hf_config(model, arch: str, source: dict) -> dict:
    """The mixture's keys of an exported ``config.json`` (``source``: an imported model's original
    config, whose training-time router options are kept)."""
    aux = {"router_aux_loss_coef": source.get("router_aux_loss_coef", 0.001),
           "output_router_logits": False}  # fmt: skip
    if arch == GLM4_MOE:
        return {**_glm_hf_config(model), "output_router_logits": False}
    if arch == MIXTRAL:
        return {"num_local_experts": model.num_experts,
                "num_experts_per_tok": model.moe_router_topk,
                "intermediate_size": model.expert_ffn_hidden_size, "router_jitter_noise": 0.0,
                **aux}  # fmt: skip
    cfg = {
        "num_experts": model.num_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "moe_intermediate_size": model.expert_ffn_hidden_size,
        "norm_topk_prob": not model.moe_router_pre_softmax,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(model.moe_layers) if not moe],
        **aux,
    }
    if arch == QWEN2_MOE:
        cfg.update(shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
                   qkv_bias=True)  # fmt: skip
    return cfg


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------
def moe_hf_shapes(model, p: str) -> dict[str, tuple[int, ...]]:
    """The tensors of layer prefix ``p``'s mixture, with their shapes (Qwen-MoE's names)."""
    h, f = model.hidden_size, model.expert_ffn_hidden_size
    shapes = {p + "mlp.gate.weight": (model.num_experts, h)}
    if model.moe_router_enable_expert_bias:
        shapes[p + "mlp.gate.e_score_correction_bias"] = (model.num_experts,)
    for e in range(model.num_experts):
        x = f"{p}mlp.experts.{e}."
        shapes.update({x + "gate_proj.weight": (f, h), x + "up_proj.weight": (f, h),
                       x + "down_proj.weight": (h, f)})  # fmt: skip
    shared = model.moe_shared_expert_intermediate_size
    if shared:
        x = f"{p}mlp.shared_expert."
        shapes.update({x + "gate_proj.weight": (shared, h), x + "up_proj.weight": (shared, h),
                       x + "down_proj.weight": (h, shared)})  # fmt: skip
        if model.moe_shared_expert_gate:
            shapes[p + "mlp.shared_expert_gate.weight"] = (1, h)
    return shapes


_EXPERT = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight")


def megatron_moe_tensor(suffix: str, p: str, weights) -> torch.Tensor | None:
    """The full megatron tensor of mixture parameter ``suffix`` in layer prefix ``p`` (None:
    not a mixture's)."""
    expert = _EXPERT.fullmatch(suffix)
    if expert:
        x = f"{p}mlp.experts.{expert.group(1)}."
    elif suffix.startswith("mlp.shared_experts.linear_fc"):
        x = f"{p}mlp.shared_expert."
    elif suffix == "mlp.router.weight":
        return weights.get(p + "mlp.gate.weight")
    elif suffix == "mlp.router.expert_bias":  # (a float32 buffer)
        return weights.get(p + "mlp.gate.e_score_correction_bias").float()
    elif suffix == "mlp.shared_experts.gate_weight":
        return weights.get(p + "mlp.shared_expert_gate.weight")
    else:
        return None
    if suffix.endswith("linear_fc2.weight"):
        return weights.get(x + "down_proj.weight")
    return torch.cat([weights.get(x + "gate_proj.weight"), weights.get(x + "up_proj.weight")])


def moe_megatron_names(model) -> tuple[str, ...]:
    """A mixture's parameters in one layer (megatron-core's names)."""
    names = ["mlp.router.weight"]
    names += ["mlp.router.expert_bias"] if model.moe_router_enable_expert_bias else []
    names += [
        f"mlp.experts.local_experts.{e}.{fc}.weight"
        for e in range(model.num_experts) for fc in ("linear_fc1", "linear_fc2")
    ]  # fmt: skip
    if model.moe_shared_expert_intermediate_size:
        names += ["mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"]
        if model.moe_shared_expert_gate:
            names.append("mlp.shared_experts.gate_weight")
    return tuple(names)


def moe_hf_tensors(state: dict, model, src: str, dst: str, fc1):
    """A layer's mixture from a full megatron state (``src``) as Qwen-MoE's tensors (``dst``);
    ``fc1(state, name, shape)`` reads a ``[gate; up]`` tensor, checking its shape."""
    h = model.hidden_size
    yield dst + "mlp.gate.weight", state[src + "mlp.router.weight"]
    if model.moe_router_enable_expert_bias:
        yield dst + "mlp.gate.e_score_correction_bias", state[src + "mlp.router.expert_bias"]
    parts = [(f"{src}mlp.experts.local_experts.{e}.", f"{dst}mlp.experts.{e}.",
              model.expert_ffn_hidden_size) for e in range(model.num_experts)]  # fmt: skip
    if model.moe_shared_expert_intermediate_size:
        shared = model.moe_shared_expert_intermediate_size
        parts.append((f"{src}mlp.shared_experts.", f"{dst}mlp.shared_expert.", shared))
    for ours, theirs, f in parts:
        gate_up = fc1(state, ours + "linear_fc1.weight", (2 * f, h))
        yield theirs + "gate_proj.weight", gate_up[:f]
        yield theirs + "up_proj.weight", gate_up[f:]
        yield theirs + "down_proj.weight", state[ours + "linear_fc2.weight"]
    if model.moe_shared_expert_gate:
        yield dst + "mlp.shared_expert_gate.weight", state[src + "mlp.shared_experts.gate_weight"]
