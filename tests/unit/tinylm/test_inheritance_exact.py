"""Inheritance on real megatron-core models (one spawned process, CPU backend):

* depth only: the inherited model's logits equal (1e-5) Hugging Face ``transformers`` running the
  source, exported, with the dropped layers deleted (an independent forward);
* width: on a source built so that the pruned hidden channels, FFN neurons, heads and KV groups
  contribute exactly zero, the pruned model's logits equal the source's (1e-5): the slicing is
  exact; activation importance then ranks exactly the zeroed hidden channels last.
"""

from __future__ import annotations

import torch

from tests.dist_helpers import run_distributed

TOL = 1e-5


def _source_arch():
    from megatron_slm.models.presets import GPTModelConfig

    return GPTModelConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=48,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=100,
        max_position_embeddings=64,
    )


def _build(arch, seed):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_slm.models import ModelBuildOptions, build_model

    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    (chunk,) = build_model(arch, ModelBuildOptions(transformer_impl="torch"))
    chunk.eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced or unscaled norm shows
        for name, p in chunk.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
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


def _depth_vs_hf(src, arch, tokens):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_slm.convert import hf_config_from_gpt, hf_tensors_from_megatron
    from megatron_slm.models.args import ModelArgs
    from megatron_slm.models.sharding import full_state_dict
    from megatron_slm.tinylm.importance import Importance
    from megatron_slm.tinylm.inheritance_plan import make_plan, target_architecture

    kept = [0, 3]
    target = target_architecture(arch, ModelArgs(num_layers=2))
    small = _inherit(src, make_plan(arch, target, kept, Importance()))

    cfg = hf_config_from_gpt(arch)
    cfg.pop("architectures"), cfg.pop("model_type"), cfg.pop("torch_dtype")
    hf = LlamaForCausalLM(LlamaConfig(**cfg)).float().eval()
    hf.load_state_dict(dict(hf_tensors_from_megatron(full_state_dict(src), arch)))
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
    """Zero every weight through which a pruned part reaches the output."""
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
    diff = float((_logits(small, tokens, 100) - _logits(src, tokens, 100)).abs().max())
    scale = float(_logits(src, tokens, 100).abs().max())
    # Activation importance sees the zeroed channels as exactly unimportant.
    lm = LoadedModel([src], arch, None, 128, torch.device("cpu"), torch.float32, "source")
    imp = calibration_statistics(lm, [Rows.causal(tokens[:, :-1], tokens[:, 1:])], width=True,
                                 depth=True)  # fmt: skip
    picks_kept = top_k(imp.hidden, target.hidden_size) == plan.hidden
    return diff, scale, picks_kept, imp.layers.tolist(), imp.calibration_loss


def _worker(rank, world):
    from megatron.core import parallel_state

    from megatron_slm.platform import enable_cpu_backend

    enable_cpu_backend()
    parallel_state.initialize_model_parallel(1, 1)
    arch = _source_arch()
    tokens = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    src = _build(arch, seed=1)
    out = {"depth": _depth_vs_hf(src, arch, tokens)}
    # Heads ranked inside each of the 2 groups (1 of 2 kept per group) ...
    out["heads"] = _width_exact(
        arch, tokens, {"hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 24}
    )
    # ... and a whole KV group dropped (its 2 heads kept together in the other).
    out["groups"] = _width_exact(
        arch, tokens, {"hidden_size": 32, "num_attention_heads": 2, "num_query_groups": 1}
    )
    return out


def test_depth_and_width_inheritance_are_exact():
    (out,) = run_distributed(_worker, 1)
    depth, src_vs_ref = out["depth"]
    assert depth <= TOL, depth
    assert src_vs_ref > 100 * TOL  # the deleted layers matter: the check is not vacuous
    for key in ("heads", "groups"):
        diff, scale, picks_kept, block_importance, loss = out[key]
        assert scale > 0.1 and diff <= TOL, (key, diff, scale)
        assert picks_kept, key
        assert len(block_importance) == 4 and all(0 < b < 2 for b in block_importance)
        assert 0 < loss < 10
