"""Inheritance planning without weights: --layers parsing, the target shape and its checks, the
kept indices, the CLI's errors before any work, and pangu-pi-1b-pro cut from a 7B-shaped Llama on
meta tensors (nothing allocated)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_slm.models.args import ModelArgs
from megatron_slm.models.presets import PRESETS, GPTModelConfig
from megatron_slm.tinylm.importance import Importance, random_importance
from megatron_slm.tinylm.inheritance_plan import (
    LayerChoice,
    check_layers,
    check_target,
    chosen_layers,
    make_plan,
    target_architecture,
    top_k,
)
from megatron_slm.tinylm.inheritance_tensors import (
    check_plan_shapes,
    megatron_shapes,
    slice_tensor,
)

# Llama-2-7B: MHA (32 heads = 32 KV groups), SwiGLU 11008, 32k vocabulary.
LLAMA_7B = GPTModelConfig(
    num_layers=32,
    hidden_size=4096,
    ffn_hidden_size=11008,
    num_attention_heads=32,
    num_query_groups=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
SMALL_SRC = GPTModelConfig(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=100,
    max_position_embeddings=64,
)


def test_layer_choice_parsing():
    assert LayerChoice.parse("ends:2,1") == LayerChoice("ends", 2, 1)
    assert LayerChoice.parse("importance").method == "importance"
    assert LayerChoice.parse("5,0,2").indices == (0, 2, 5)
    assert LayerChoice.parse(None) is None
    for bad in ("ends:2", "first", "1,1", "-1,2", "ends:-1,2"):
        with pytest.raises(ValueError, match="--layers"):
            LayerChoice.parse(bad)
    assert chosen_layers(LayerChoice.parse("ends:2,1"), SMALL_SRC, 3) == [0, 1, 3]
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7])
    assert chosen_layers(LayerChoice("importance"), SMALL_SRC, 2, scores) == [0, 3]
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2) == [1, 2]  # ties to the lower index


def test_target_architecture_keeps_source_vocab_rope_eps():
    src = GPTModelConfig(**{**LLAMA_7B.__dict__, "rotary_base": 500000.0, "norm_epsilon": 1e-6})
    tgt = target_architecture(src, ModelArgs(model_preset="pangu-pi-1b-pro"))
    pangu = PRESETS["pangu-pi-1b-pro"]
    assert (tgt.num_layers, tgt.hidden_size, tgt.ffn_hidden_size) == (20, 1792, 4864)
    assert (tgt.num_attention_heads, tgt.num_query_groups) == (14, 14)
    assert (tgt.vocab_size, tgt.rotary_base) == (32000, 500000.0)
    assert tgt.norm_epsilon == pytest.approx(1e-6 * 4096 / 1792)  # see InheritancePlan
    assert tgt.max_position_embeddings == pangu.max_position_embeddings
    # Depth from --layers when neither a flag nor a preset sets it.
    assert (
        target_architecture(SMALL_SRC, ModelArgs(), LayerChoice.parse("ends:1,1")).num_layers == 2
    )
    with pytest.raises(ValueError, match="--rotary-base"):
        target_architecture(SMALL_SRC, ModelArgs(rotary_base=5.0))


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"hidden_size": 128, "num_attention_heads": 8}, "--hidden-size 128 is larger"),
        ({"num_layers": 5}, "--num-layers 5 is larger"),
        ({"ffn_hidden_size": 64}, "--ffn-hidden-size 64 is larger"),
        (
            {"hidden_size": 48, "num_attention_heads": 3, "num_query_groups": 2},
            "--num-query-groups 2 does not divide --num-attention-heads 3",
        ),
        ({"hidden_size": 48}, "head dimension 12"),
        ({"hidden_size": 48, "num_attention_heads": 3, "num_query_groups": 1}, "query heads per"),
    ],
)
def test_target_errors_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        check_target(SMALL_SRC, target_architecture(SMALL_SRC, ModelArgs(**flags)))


def test_layers_must_match_target_depth():
    tgt = target_architecture(SMALL_SRC, ModelArgs(num_layers=2))
    with pytest.raises(ValueError, match="choose which to keep with --layers"):
        check_layers(None, SMALL_SRC, tgt)
    with pytest.raises(ValueError, match="keeps 3 layers"):
        check_layers(LayerChoice.parse("ends:2,1"), SMALL_SRC, tgt)
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        check_layers(LayerChoice.parse("0,7"), SMALL_SRC, tgt)


def test_plan_keeps_gqa_groups_whole_and_ranks_heads_inside():
    tgt = target_architecture(
        SMALL_SRC, ModelArgs(hidden_size=32, num_attention_heads=2, num_query_groups=1)
    )
    check_target(SMALL_SRC, tgt)
    imp = Importance(
        hidden=torch.arange(64.0),
        ffn={0: torch.arange(32.0).flip(0)},
        heads={0: torch.tensor([1.0, 2.0, 5.0, 0.5])},  # group 1 (heads 2, 3) sums higher
    )
    plan = make_plan(SMALL_SRC, tgt, [0], imp)
    assert plan.hidden == list(range(32, 64))
    assert plan.ffn[0] == list(range(32))
    assert plan.groups[0] == [1] and plan.heads[0] == [[0, 1]]
    assert plan.norm_scale == pytest.approx(2**0.5)


def test_qkv_and_proj_slicing_follow_the_group_layout():
    """Rows of linear_qkv are [q of group g, k_g, v_g]; columns of linear_proj are heads in
    order: label every row/column with its head and check what comes out."""
    src = SMALL_SRC  # 2 groups x 2 heads, head_dim 16
    tgt = target_architecture(src, ModelArgs(hidden_size=32, num_attention_heads=2))  # 2 groups x 1
    imp = Importance(hidden=torch.arange(64.0), heads={0: torch.tensor([1.0, 2.0, 5.0, 0.5])})
    plan = make_plan(src, tgt, [0], imp)
    assert plan.groups[0] == [0, 1] and plan.heads[0] == [[1], [0]]
    d = src.head_dim
    # qkv row labels: group g, slot j (0,1 = q heads, 2 = k, 3 = v) -> 10 * g + j
    labels = torch.tensor([10 * g + j for g in range(2) for j in range(4) for _ in range(d)])
    qkv = labels[:, None].float().expand(-1, 64).clone()
    name, out = slice_tensor("decoder.layers.0.self_attention.linear_qkv.weight", qkv, plan)
    rows = out[::d, 0].tolist()
    assert rows == [1, 2, 3, 10, 12, 13]  # g0: q1, k, v; g1: q0, k, v
    assert out.shape == (6 * d, 32)
    head_cols = torch.arange(4).repeat_interleave(d).float()
    proj = head_cols[None, :].expand(64, -1).clone()
    _, out = slice_tensor("decoder.layers.0.self_attention.linear_proj.weight", proj, plan)
    assert out[0, ::d].tolist() == [1.0, 2.0] and out.shape == (32, 2 * d)


def test_pangu_from_7b_llama_on_meta_tensors():
    """pangu-pi-1b-pro from a 7B-shaped Llama: every sliced tensor has the target's shape, checked
    on meta tensors (the 7B is never allocated)."""
    tgt = target_architecture(LLAMA_7B, ModelArgs(model_preset="pangu-pi-1b-pro"))
    check_target(LLAMA_7B, tgt)
    layers = chosen_layers(LayerChoice.parse("ends:10,10"), LLAMA_7B, tgt.num_layers)
    plan = make_plan(LLAMA_7B, tgt, layers, random_importance(LLAMA_7B, 0))
    check_plan_shapes(plan, 32000)
    assert tgt.num_parameters(32000) == sum(
        torch.Size(s).numel() for s in megatron_shapes(tgt, 32000).values()
    )
    assert tgt.num_parameters(32000) < 1.2e9 < 6.7e9 < LLAMA_7B.num_parameters(32000)
    assert plan.layers == list(range(10)) + list(range(22, 32))
    assert all(len(h) == 1 for n in plan.layers for h in plan.heads[n])


def _fake_checkpoint(root, arch: GPTModelConfig) -> str:
    it = os.path.join(root, "iter_0000001")
    os.makedirs(it)
    meta = {"format_version": 1, "model": arch.__dict__, "padded_vocab_size": 128}
    with open(os.path.join(it, "megatron_slm.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
    return str(root)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hidden-size", "128", "--num-attention-heads", "8"], "--hidden-size 128 is larger"),
        (
            ["--hidden-size", "48", "--num-attention-heads", "3"],
            "--num-query-groups 2 does not divide --num-attention-heads 3",
        ),
        (["--hidden-size", "32", "--num-attention-heads", "2"], "activation needs --calibration"),
        (["--num-layers", "2", "--layers", "importance"], "importance needs --calibration-data"),
        (["--num-layers", "2"], "choose which to keep with --layers"),
        (["--layers", "ends:1,1", "--calibration-data", "/nonexistent/x"], "x.idx not found"),
        (["--tensor-model-parallel-size", "3"], "does not divide --num-attention-heads 4"),
        (["--normalization", "LayerNorm"], "--normalization LayerNorm differs from the source's"),
    ],
)
def test_cli_bad_input_fails_before_any_work(tmp_path, capsys, flags, message):
    """Errors exit 2 naming the flag, before a process group or a weight (the fake checkpoint
    holds metadata only: any attempt to load weights would fail differently)."""
    import tools.inherit_parameters as tool

    load = _fake_checkpoint(tmp_path / "big", SMALL_SRC)
    argv = ["--load", load, "--save", str(tmp_path / "small"), *flags]
    assert tool.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "small")
