"""Inheritance on real megatron-core models (one spawned process, CPU backend), for Llama's
architecture and the two Qwen variants inheritance takes: Qwen2's (QKV biases, tied embeddings)
and Qwen3's (QK norm, heads that do not split the width, untied):

* depth only: the inherited model's logits equal (1e-5) Hugging Face ``transformers`` running the
  source, exported (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM), with the dropped layers
  deleted (an independent forward);
* width: on a source built so that the pruned hidden channels, FFN neurons, heads and KV groups
  contribute exactly zero, the pruned model's logits equal the source's (1e-5): the slicing is
  exact; activation importance then ranks exactly the zeroed hidden channels last.

Every parameter the slicing rules list (``megatron_shapes``) is checked against the built model's.
"""

from __future__ import annotations

import torch

from tests.dist_helpers import run_distributed

TOL = 1e-5
FAMILIES = {
    "llama": {},
    # 8 heads of 8 in 4 KV groups; biases and tying change no shape.
    "qwen2": {"num_attention_heads": 8, "num_query_groups": 4, "add_qkv_bias": True,
              "tied_embeddings": True},
    # 8 heads of 12 on a width of 64; a large epsilon, so that the QK norms' epsilon (the model's,
    # scaled by h/h' in the target) would show if the query and key rows were not rescaled.
    "qwen3": {"num_attention_heads": 8, "num_query_groups": 4, "kv_channels": 12,
              "qk_layernorm": True, "norm_epsilon": 1e-3},
}  # fmt: skip
# Width cuts per family (Llama: heads ranked inside each of 2 groups, then a whole group dropped;
# Qwen: 2 of 4 groups kept, 1 of the 2 heads in each, hidden and FFN narrower).
WIDTH = {
    "llama": {
        "heads": {"hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 24},
        "groups": {"hidden_size": 32, "num_attention_heads": 2, "num_query_groups": 1},
    },
    "qwen2": {
        "groups": {"hidden_size": 16, "num_attention_heads": 2, "num_query_groups": 2,
                   "ffn_hidden_size": 24},
    },
    "qwen3": {  # heads of 12 stay 12: 2 x 12 = 24 on a width of 32
        "groups": {"hidden_size": 32, "num_attention_heads": 2, "num_query_groups": 2,
                   "ffn_hidden_size": 24},
    },
}  # fmt: skip


def _source_arch(family="llama"):
    from megatron_slm.models.presets import GPTModelConfig

    shape = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=48,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return GPTModelConfig(**{**shape, **FAMILIES[family]})


def _build(arch, seed):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm.models import ModelBuildOptions, build_model

    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    (chunk,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"))
    chunk.eval()
    with torch.no_grad():  # non-trivial norm weights and biases (megatron-core's are 1 and 0),
        for name, p in chunk.named_parameters():  # so a misplaced or unscaled one shows
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.3, 0.3)
    return chunk


def _logits(chunk, tokens, vocab):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return chunk(tokens, pos, None)[..., :vocab].float()


def _inherit(src, plan):
    from megatron_slm.models.sharding import full_state_dict
    from megatron_slm.tinylm.inheritance import load_state_into
    from megatron_slm.tinylm.inheritance_tensors import slice_tensor

    state = {}
    for name, full in full_state_dict(src).items():
        out = slice_tensor(name, full, plan)
        if out is not None:
            state[out[0]] = out[1]
    small = _build(plan.target, seed=99)  # different random weights: all must be overwritten
    load_state_into(small, state)
    return small


def _hf_model(src, arch):
    """The source exported to Hugging Face (the architecture export picks for it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_slm.convert import hf_config_from_gpt, hf_tensors_from_megatron
    from megatron_slm.convert.hf import export_architecture
    from megatron_slm.models.sharding import full_state_dict

    cfg = hf_config_from_gpt(arch, export_architecture(arch))
    cfg.pop("architectures"), cfg.pop("torch_dtype")
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).float().eval()
    missing, unexpected = hf.load_state_dict(
        dict(hf_tensors_from_megatron(full_state_dict(src), arch)), strict=False
    )
    # Tied: lm_head is the embedding's own parameter, which the export does not repeat.
    assert not unexpected and missing == (["lm_head.weight"] if arch.tied_embeddings else [])
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == arch.tied_embeddings
    return hf


def _depth_vs_hf(src, arch, tokens):
    from megatron_slm.models.args import ModelArgs
    from megatron_slm.tinylm.importance import Importance
    from megatron_slm.tinylm.inheritance_plan import make_plan, target_architecture

    kept = [0, 3]
    target = target_architecture(arch, ModelArgs(num_layers=2))
    small = _inherit(src, make_plan(arch, target, kept, Importance()))

    hf = _hf_model(src, arch)
    # Delete the dropped layers from the independent model.
    hf.model.layers = torch.nn.ModuleList([hf.model.layers[i] for i in kept])
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.layer_idx = i
    hf.config.num_hidden_layers = len(kept)
    with torch.no_grad():
        ref = hf(tokens, use_cache=False).logits.float()
    ours = _logits(small, tokens, arch.vocab_size)
    return float((ours - ref).abs().max()), float((_logits(src, tokens, 100) - ref).abs().max())


def _zero_pruned_parts(src, plan):
    """Zero every weight through which a pruned part reaches the output. A pruned head's QKV
    biases stay non-zero: its ``linear_proj`` columns already cut it off, and a slice that took
    its bias for a kept head's would show."""
    a = plan.source
    d, r = a.head_dim, a.num_attention_heads // a.num_query_groups
    dropped_hidden = sorted(set(range(a.hidden_size)) - set(plan.hidden))
    with torch.no_grad():
        src.embedding.word_embeddings.weight[:, dropped_hidden] = 0
        for layer in src.decoder.layers:
            n = layer.layer_number - 1
            proj, fc2 = layer.self_attention.linear_proj.weight, layer.mlp.linear_fc2.weight
            proj[dropped_hidden] = 0  # attention never writes the dropped channels
            fc2[dropped_hidden] = 0  # nor does the MLP
            kept_neurons = set(plan.ffn[n])
            fc2[:, [i for i in range(a.ffn_hidden_size) if i not in kept_neurons]] = 0
            kept_heads = {g * r + h for i, g in enumerate(plan.groups[n]) for h in plan.heads[n][i]}
            for head in set(range(a.num_attention_heads)) - kept_heads:
                proj[:, head * d : (head + 1) * d] = 0


def _width_exact(arch, tokens, flags):
    from megatron_slm.models.args import ModelArgs
    from megatron_slm.runtime import LoadedModel
    from megatron_slm.runtime.forward import Rows
    from megatron_slm.tinylm.importance import calibration_statistics, random_importance
    from megatron_slm.tinylm.inheritance_plan import (
        check_target,
        make_plan,
        target_architecture,
        top_k,
    )

    target = target_architecture(arch, ModelArgs(**flags))
    check_target(arch, target)
    plan = make_plan(arch, target, list(range(arch.num_layers)), random_importance(arch, 7))
    src = _build(arch, seed=3)
    _zero_pruned_parts(src, plan)
    small = _inherit(src, plan)
    reference = _logits(src, tokens, 100)
    diff = float((_logits(small, tokens, 100) - reference).abs().max())
    scale = float(reference.abs().max())
    biases = 0.0  # how far the logits move without the kept QKV biases: they are tested
    if arch.add_qkv_bias:
        with torch.no_grad():
            for layer in small.decoder.layers:
                layer.self_attention.linear_qkv.bias.zero_()
        biases = float((_logits(small, tokens, 100) - reference).abs().max())
    # Activation importance sees the zeroed channels as exactly unimportant.
    lm = LoadedModel([src], arch, None, 128, torch.device("cpu"), torch.float32, "source")
    imp = calibration_statistics(lm, [Rows.causal(tokens[:, :-1], tokens[:, 1:])], width=True,
                                 depth=True)  # fmt: skip
    picks_kept = top_k(imp.hidden, target.hidden_size) == plan.hidden
    return diff, scale, picks_kept, imp.layers.tolist(), imp.calibration_loss, biases


def _worker(rank, world):
    from megatron.core import parallel_state

    from megatron_slm.models.sharding import full_state_dict
    from megatron_slm.platform import enable_cpu_backend
    from megatron_slm.tinylm.inheritance_tensors import megatron_shapes

    enable_cpu_backend()
    parallel_state.initialize_model_parallel(1, 1)
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    out = {}
    for family in FAMILIES:
        arch = _source_arch(family)
        src = _build(arch, seed=1)
        built = {k: tuple(v.shape) for k, v in full_state_dict(src).items()}
        out[family, "shapes"] = built == megatron_shapes(arch, src.vocab_size)
        out[family, "depth"] = _depth_vs_hf(src, arch, tokens)
        for case, flags in WIDTH[family].items():
            out[family, case] = _width_exact(arch, tokens, flags)
    return out


def test_depth_and_width_inheritance_are_exact():
    (out,) = run_distributed(_worker, 1)
    for family in FAMILIES:
        assert out[family, "shapes"], family
        depth, src_vs_ref = out[family, "depth"]
        assert depth <= TOL, (family, depth)
        assert src_vs_ref > 100 * TOL  # the deleted layers matter: the check is not vacuous
        for case in WIDTH[family]:
            diff, scale, picks_kept, block_importance, loss, biases = out[family, case]
            assert scale > 0.1 and diff <= TOL, (family, case, diff, scale)
            assert picks_kept, (family, case)
            assert len(block_importance) == 4 and all(0 < b < 2 for b in block_importance)
            assert 0 < loss < 10
            assert biases > 100 * TOL or not FAMILIES[family].get("add_qkv_bias")
