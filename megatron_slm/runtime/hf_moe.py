"""Hugging Face's mixtures of experts as megatron-core's, both ways: Mixtral, Qwen2-MoE, Qwen3-MoE.

All three are Llama's design with some MLPs replaced by a router over SwiGLU experts. Their
tensors here carry Qwen-MoE's names: ``mlp.gate`` (the router), ``mlp.experts.E.{gate,up,down}
_proj``, and Qwen2-MoE's ``mlp.shared_expert.*`` with its ``mlp.shared_expert_gate``.
:class:`MixtralWeights` shows a Mixtral directory's ``block_sparse_moe.{gate, experts.E.w1/w3/w2}``
under those names (w1 the gate, w3 the up projection, w2 the down projection), and
:func:`mixtral_names` renames an export back.

Routing: Mixtral's and a Qwen-MoE with ``norm_topk_prob`` weigh the k chosen experts by the softmax
over their logits (megatron-core's router without pre-softmax); a Qwen-MoE without it by the
softmax over all experts, unrenormalised (``--moe-router-pre-softmax``). Qwen-MoE layer ``i``
has a mixture unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step`` is not 0
(the others a dense MLP of ``intermediate_size``: ``--moe-layer-freq``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

MIXTRAL = "MixtralForCausalLM"
QWEN2_MOE = "Qwen2MoeForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
MOE_ARCHITECTURES = {MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", QWEN3_MOE: "qwen3_moe"}
"""Architecture -> ``model_type``."""
_MIXTRAL_NAME = re.compile(
    r"(model\.layers\.\d+\.)block_sparse_moe\.(gate|experts\.\d+\.w[123])\.weight"
)
_MIXTRAL_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_QWEN_NAME = re.compile(
    r"(model\.layers\.\d+\.)mlp\.(gate|experts\.\d+\.(gate|up|down)_proj)\.weight"
)


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


class MixtralWeights:
    """An ``HFWeights`` of a Mixtral directory with its mixture's tensors under Qwen-MoE's names
    (everything else as it is)."""

    def __init__(self, weights):
        self._weights, self.path = weights, weights.path
        self._renamed: dict[str, str] = {}  # Qwen-MoE name -> Mixtral's
        for name in weights.names():
            m = _MIXTRAL_NAME.fullmatch(name)
            if m:
                self._renamed[f"{m.group(1)}mlp.{_qwen_suffix(m.group(2))}.weight"] = name

    def _source(self, name: str) -> str:
        return self._renamed.get(name, name)

    def names(self) -> list[str]:
        mixtral = set(self._renamed.values())
        return [n for n in self._weights.names() if n not in mixtral] + list(self._renamed)

    def __contains__(self, name: str) -> bool:
        return name in self._renamed or (
            name in self._weights and not _MIXTRAL_NAME.fullmatch(name)
        )

    def shape(self, name: str) -> tuple[int, ...]:
        return self._weights.shape(self._source(name))

    def get(self, name: str) -> torch.Tensor:
        return self._weights.get(self._source(name))

    def location(self, name: str) -> str:
        return self._weights.location(self._source(name))

    def source_name(self, name: str) -> str:
        """The directory's own name of a tensor (for messages about a missing one)."""
        m = _QWEN_NAME.fullmatch(name)
        return f"{m.group(1)}block_sparse_moe.{_mixtral_suffix(m.group(2))}.weight" if m else name


def mixtral_names(
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Export tensors under Qwen-MoE's names -> Mixtral's."""
    for name, tensor in tensors:
        m = _QWEN_NAME.fullmatch(name)
        if m:
            name = f"{m.group(1)}block_sparse_moe.{_mixtral_suffix(m.group(2))}.weight"
        yield name, tensor


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def moe_choices(cfg: dict, arch: str) -> dict:
    """The mixture fields of a ``GPTModelConfig`` from a Mixtral or Qwen-MoE config."""
    if arch == MIXTRAL:
        return {"num_experts": cfg["num_local_experts"],
                "moe_router_topk": cfg["num_experts_per_tok"]}  # fmt: skip
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


def moe_hf_config(model, arch: str, source: dict) -> dict:
    """The mixture's keys of an exported ``config.json`` (``source``: an imported model's original
    config, whose training-time router options are kept)."""
    aux = {"router_aux_loss_coef": source.get("router_aux_loss_coef", 0.001),
           "output_router_logits": False}  # fmt: skip
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
    elif suffix == "mlp.shared_experts.gate_weight":
        return weights.get(p + "mlp.shared_expert_gate.weight")
    else:
        return None
    if suffix.endswith("linear_fc2.weight"):
        return weights.get(x + "down_proj.weight")
    return torch.cat([weights.get(x + "gate_proj.weight"), weights.get(x + "up_proj.weight")])


def moe_megatron_names(model) -> tuple[str, ...]:
    """A mixture's parameters in one layer (megatron-core's names)."""
    names = ["mlp.router.weight"] + [
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
