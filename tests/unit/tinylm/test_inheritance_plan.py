"""Inheritance planning without weights: --layers parsing, the target shape and its checks, the
kept indices, the CLI's errors before any work, and pangu-pi-1b-pro cut from a 7B-shaped Llama on
meta tensors (nothing allocated)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from megatron_slm.models.args import ModelArgs
from megatron_slm.models.presets import GPT3_KIND, PRESETS, GPTModelConfig, LongRope
from megatron_slm.tinylm.importance import (
    Importance,
    magnitude_contributions,
    random_importance,
)
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
# Qwen3-0.6B (QK norm, 16 heads of 128 on a width of 1024, tied) and Qwen2.5-0.5B (QKV biases,
# tied): the published configs' shapes.
QWEN3_06B = GPTModelConfig(
    num_layers=28,
    hidden_size=1024,
    ffn_hidden_size=3072,
    num_attention_heads=16,
    num_query_groups=8,
    kv_channels=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rotary_base=1000000.0,
    norm_epsilon=1e-6,
    qk_layernorm=True,
    tied_embeddings=True,
)
QWEN25_05B = GPTModelConfig(
    num_layers=24,
    hidden_size=896,
    ffn_hidden_size=4864,
    num_attention_heads=14,
    num_query_groups=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rotary_base=1000000.0,
    norm_epsilon=1e-6,
    add_qkv_bias=True,
    tied_embeddings=True,
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
    # A sliding window (Mistral's) is how the inherited heads learned to attend: kept.
    mistral = SMALL_SRC.replace(window_size=4095)
    assert target_architecture(mistral, ModelArgs(num_layers=2)).window_size == 4095
    with pytest.raises(ValueError, match="--window-size 7,0 differs from the source's"):
        target_architecture(mistral, ModelArgs(window_size="7,0"))
    # So is LongRoPE (Phi-3.5's): the inherited heads keep the source's frequencies, and the
    # record survives the checkpoint's JSON (lists) unchanged.
    phi = SMALL_SRC.replace(longrope=LongRope([1.0] * 8, [2.0] * 8, 4096, 1.19))
    target = target_architecture(
        phi, ModelArgs(num_layers=2, hidden_size=32, num_attention_heads=2)
    )
    assert target.longrope == phi.longrope and target.head_dim == phi.head_dim
    assert GPTModelConfig(**json.loads(json.dumps(dataclasses.asdict(target)))) == target


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


@pytest.mark.parametrize(
    "source, flags, layers",
    [
        (QWEN3_06B, {"num_layers": 14, "hidden_size": 512, "ffn_hidden_size": 1536,
                     "num_attention_heads": 8, "num_query_groups": 4}, "ends:7,7"),
        (QWEN25_05B, {"num_layers": 12, "hidden_size": 448, "ffn_hidden_size": 2432,
                      "num_attention_heads": 7, "num_query_groups": 1}, "ends:6,6"),
    ],
    ids=["qwen3-0.6b", "qwen2.5-0.5b"],
)  # fmt: skip
def test_qwen_sources_on_meta_tensors(source, flags, layers):
    """The target keeps the source's kind (QKV biases, QK norm, tied embeddings) and head size;
    every sliced tensor has the target's shape, whose count is the target's parameter count."""
    tgt = target_architecture(source, ModelArgs(**flags))
    check_target(source, tgt)
    assert tgt.kind == source.kind and tgt.head_dim == source.head_dim
    # Qwen3's heads of 128 no longer split the width (8 x 128 on 512); Qwen2.5's still do.
    assert tgt.kv_channels == (128 if source.qk_layernorm else None)
    plan = make_plan(
        source,
        tgt,
        chosen_layers(LayerChoice.parse(layers), source, tgt.num_layers),
        random_importance(source, 0),
    )
    check_plan_shapes(plan, 151936)
    shapes = megatron_shapes(tgt, 151936)
    assert "output_layer.weight" not in shapes  # tied
    assert tgt.num_parameters(151936) == sum(torch.Size(s).numel() for s in shapes.values())
    assert ("qk_scale" in plan.record()) == source.qk_layernorm


def test_qkv_bias_and_qk_norm_slicing():
    """linear_qkv's bias rows follow its weight rows ([q of group g, k_g, v_g]); with QK norm the
    query and key rows are scaled by the norm scale (the norms' epsilon is the target's, h/h'
    larger) and the QK norm weights, one per channel of a head, are copied unchanged."""
    src = SMALL_SRC.replace(add_qkv_bias=True, qk_layernorm=True)  # 2 groups x 2 heads of 16
    tgt = target_architecture(src, ModelArgs(hidden_size=32, num_attention_heads=2))
    imp = Importance(hidden=torch.arange(64.0), heads={0: torch.tensor([1.0, 2.0, 5.0, 0.5])})
    plan = make_plan(src, tgt, [0], imp)
    assert plan.groups[0] == [0, 1] and plan.heads[0] == [[1], [0]]
    c = 2**0.5  # sqrt(64 / 32)
    assert plan.qk_scale == pytest.approx(c)
    d = src.head_dim
    labels = torch.tensor([10.0 * g + j for g in range(2) for j in range(4) for _ in range(d)])
    name, out = slice_tensor("decoder.layers.0.self_attention.linear_qkv.bias", labels, plan)
    assert name == "decoder.layers.0.self_attention.linear_qkv.bias" and out.shape == (6 * d,)
    assert out[::d].tolist() == pytest.approx([1 * c, 2 * c, 3, 10 * c, 12 * c, 13])
    weight = labels[:, None].expand(-1, 64).clone()
    _, out = slice_tensor("decoder.layers.0.self_attention.linear_qkv.weight", weight, plan)
    assert out[::d, 0].tolist() == pytest.approx([1 * c, 2 * c, 3, 10 * c, 12 * c, 13])
    norm = torch.linspace(0.5, 1.5, d)
    later = make_plan(src, tgt, [1], Importance(hidden=imp.hidden, heads={1: imp.heads[0]}))
    for part in ("q", "k"):
        prefix = "decoder.layers.{}.self_attention." + part
        name, out = slice_tensor(prefix.format(1) + "_layernorm.weight", norm, later)
        assert name == prefix.format(0) + "_layernorm.weight" and torch.equal(out, norm)


def test_tied_embedding_copy_on_the_last_stage_is_not_inherited_twice():
    """At PP>1 a tied model's last stage holds the embedding as output_layer.weight: the target
    ties its own output layer, and magnitude importance counts the embedding once."""
    src = SMALL_SRC.replace(tied_embeddings=True)
    tgt = target_architecture(src, ModelArgs(hidden_size=32, num_attention_heads=2))
    plan = make_plan(src, tgt, list(range(4)), random_importance(src, 0))
    emb = torch.randn(128, 64)
    assert slice_tensor("output_layer.weight", emb, plan) is None
    assert slice_tensor("embedding.word_embeddings.weight", emb, plan)[1].shape == (128, 32)
    assert magnitude_contributions("output_layer.weight", emb, src) == {}
    assert list(magnitude_contributions("output_layer.weight", emb, SMALL_SRC)) == [
        "hidden.output_layer.weight"
    ]


def test_head_size_is_the_sources():
    """--kv-channels may only confirm the source's head size; with it, a Llama's hidden width
    can shrink under heads kept whole (heads x head size no longer the width)."""
    with pytest.raises(ValueError, match="--kv-channels 8 differs from the source's head size 16"):
        target_architecture(SMALL_SRC, ModelArgs(kv_channels=8))
    with pytest.raises(ValueError, match="give --kv-channels 16 for heads"):
        check_target(SMALL_SRC, target_architecture(SMALL_SRC, ModelArgs(hidden_size=48)))
    tgt = target_architecture(SMALL_SRC, ModelArgs(hidden_size=48, kv_channels=16))
    check_target(SMALL_SRC, tgt)
    assert (tgt.kv_channels, tgt.head_dim, tgt.num_attention_heads) == (16, 16, 4)
    qwen3 = SMALL_SRC.replace(kv_channels=24, qk_layernorm=True)
    assert target_architecture(qwen3, ModelArgs(hidden_size=32)).head_dim == 24


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


def test_cli_takes_qwen_sources_and_refuses_gpt3s(tmp_path, capsys):
    """The kind check: a Qwen3-like source (QK norm, heads of 24 on a width of 64, tied) goes on
    to the next check; GPT-3's (LayerNorm, GeLU, learned positions, biases) is refused in one
    line that says what is taken."""
    import tools.inherit_parameters as tool

    qwen3 = SMALL_SRC.replace(kv_channels=24, qk_layernorm=True, tied_embeddings=True)
    gpt3 = GPTModelConfig(**{**SMALL_SRC.__dict__, **GPT3_KIND})
    for name, arch, messages in [
        ("qwen3", qwen3, ["choose which to keep with --layers"]),
        ("gpt3", gpt3, ["parameter inheritance takes Llama's architecture (RMSNorm, SwiGLU, RoPE",
                        "also with Qwen's QKV biases, QK norm, tied embeddings or a head size",
                        "the checkpoint's is GPT-3 architecture (LayerNorm, GeLU"]),
        ("moe", SMALL_SRC.replace(num_experts=4), ["plain norm weights, a dense MLP)",
                                                   "untied embeddings, 4 experts, top-2)"]),
    ]:  # fmt: skip
        load = _fake_checkpoint(tmp_path / name, arch)
        argv = ["--load", load, "--save", str(tmp_path / f"{name}_small"), "--num-layers", "2"]
        assert tool.main(argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert all(m in last for m in messages), last
        assert not os.path.exists(tmp_path / f"{name}_small")
