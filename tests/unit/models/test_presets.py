import dataclasses
import re

import pytest
import torch

from megatron_slm.models import PRESETS, check_parallel_layout, get_preset, padded_vocab_size
from megatron_slm.models.presets import pipeline_stage_layers


@pytest.mark.parametrize(
    "name, expected",
    [("tinyllama-1.1b", 1_100_048_384), ("mistral-7b", 7_241_732_096)],
)
def test_published_parameter_counts(name, expected):
    assert get_preset(name).num_parameters() == expected


def test_pangu_pi_1b_pro_shape():
    cfg = get_preset("pangu-pi-1b-pro")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (1792, 14, 48000)
    assert cfg.ffn_hidden_size == 4864 and cfg.ffn_hidden_size >= cfg.hidden_size * 8 / 3


def test_pangu_pi_1_5b_pro_matches_the_paper():
    """Width, depth and vocabulary of the paper's configuration table; the total, counted here
    layer by layer, is the paper's 1.5B (Figure 1) to the digit it prints."""
    cfg = get_preset("pangu-pi-1.5b-pro")
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (2048, 22, 48000)
    assert cfg.hidden_size // cfg.num_attention_heads == 1792 // 14  # the 1B Pro's head size
    h, f = 2048, 6912
    layer = 4 * h * h + 3 * h * f + 2 * h  # attention (MHA), SwiGLU, two norms
    expected = 22 * layer + h + 2 * 48000 * h
    assert cfg.num_parameters() == expected == 1_500_080_128
    assert round(cfg.num_parameters() / 1e9, 1) == 1.5
    assert cfg.ffn_hidden_size % 256 == 0
    # the 1B Pro's 8/3 rule would miss the paper's figure
    ratio_8_3 = dataclasses.replace(cfg, ffn_hidden_size=5632)
    assert round(ratio_8_3.num_parameters() / 1e9, 1) == 1.3


def test_unknown_preset_names_the_flag():
    with pytest.raises(ValueError, match="--model-preset 'gpt5'.*tiny"):
        get_preset("gpt5")


def test_overrides_replace_fields_and_ignore_none():
    cfg = get_preset("tiny").replace(num_layers=2, hidden_size=None)
    assert cfg.num_layers == 2 and cfg.hidden_size == PRESETS["tiny"].hidden_size


@pytest.mark.parametrize(
    "tp, pp, vstage, flag",
    [
        (3, 1, None, "--tensor-model-parallel-size 3 does not divide --num-attention-heads"),
        (4, 1, None, "--tensor-model-parallel-size 4 does not divide --num-query-groups"),
        (1, 3, None, "--pipeline-model-parallel-size 3 does not divide --num-layers"),
        (1, 2, 3, "--num-layers-per-virtual-pipeline-stage 3"),
        (1, 1, 1, "--num-layers-per-virtual-pipeline-stage needs"),
    ],
)
def test_bad_layout_names_the_flag(tp, pp, vstage, flag):
    with pytest.raises(ValueError, match=flag):
        check_parallel_layout(get_preset("tiny"), tp, pp, vstage)


@pytest.mark.parametrize(
    "layers, pp, first, last",
    [
        (4, 2, 1, None),
        (4, 3, None, 2),
        (10, 4, 1, 3),
        (7, 3, 3, 2),
        (8, 2, 5, 3),
        (6, 3, None, None),
    ],
)
def test_uneven_pipeline_stages_are_megatron_cores(layers, pp, first, last):
    """Each stage's layers, and so its first layer, as megatron-core numbers them
    (``get_transformer_layer_offset`` of a config with the same split)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    stages = pipeline_stage_layers(layers, pp, first, last)
    assert sum(stages) == layers and len(stages) == pp
    config = TransformerConfig(
        num_layers=layers, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=pp,
        num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
        pipeline_dtype=torch.float32,
    )  # fmt: skip
    offsets = [get_transformer_layer_offset(config, pp_rank=r) for r in range(pp)]
    assert offsets == [sum(stages[:r]) for r in range(pp)]
    if first is not None:
        assert stages[0] == first
    if last is not None:
        assert stages[-1] == last


@pytest.mark.parametrize(
    "layers, pp, first, last, vstage, message",
    [
        (4, 3, 1, None, None, "less --decoder-first-pipeline-num-layers 1 leaves 3 layers for "
                              "the 2 pipeline stages between: they must split evenly"),
        (4, 2, 1, 2, None, "leaves 1 layers for the 0 pipeline stages between"),
        (4, 3, 2, 2, None, "leaves 0 layers for the 1 pipeline stages between"),
        (4, 2, 5, None, None, "leaves -1 layers"),
        (4, 2, 0, None, None, "--decoder-first-pipeline-num-layers must be >= 1, got 0"),
        (4, 1, None, 2, None, "--decoder-last-pipeline-num-layers needs --pipeline-model-parallel"),
        (4, 2, 1, None, 1, "not supported with --num-layers-per-virtual-pipeline-stage: give "
                           "--num-virtual-stages-per-pipeline-rank"),
        (6, 2, 1, None, -2, "--num-virtual-stages-per-pipeline-rank 2 does not divide the 1 "
                            "layers of pipeline stage 0"),
        (6, 2, 3, None, -2, "does not divide the 3 layers of pipeline stage 0"),
        (6, 1, None, None, -2, "--num-virtual-stages-per-pipeline-rank 2 needs "
                               "--pipeline-model-parallel-size > 1"),
        (5, 2, None, None, None, "(or set the first or last stage's layers: --decoder-first"),
    ],
)  # fmt: skip
def test_uneven_stages_that_do_not_fit_name_the_flags(layers, pp, first, last, vstage, message):
    """(``vstage`` -V: --num-virtual-stages-per-pipeline-rank V.)"""
    model = get_preset("tiny").replace(num_layers=layers)
    virtual = -vstage if vstage is not None and vstage < 0 else None
    vstage = None if virtual else vstage
    with pytest.raises(ValueError, match=re.escape(message)):
        check_parallel_layout(model, 1, pp, vstage, first, last, virtual)


@pytest.mark.parametrize(
    "layers, pp, first, last, virtual",
    [(6, 2, 2, None, 2), (8, 3, 2, 2, 2), (15, 3, None, 3, 3), (4, 2, None, None, 2)],
)
def test_virtual_stages_split_each_stage_as_megatron_core(layers, pp, first, last, virtual):
    """--num-virtual-stages-per-pipeline-rank: each stage's layers (uneven ones too) into that
    many equal chunks, as megatron-core builds them (``get_num_layers_to_build``)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig

    model = get_preset("tiny").replace(num_layers=layers)
    check_parallel_layout(model, 1, pp, None, first, last, virtual)
    stages = pipeline_stage_layers(layers, pp, first, last)
    config = TransformerConfig(
        num_layers=layers, hidden_size=8, num_attention_heads=2, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual, num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last, pipeline_dtype=torch.float32,
    )  # fmt: skip
    for rank, layers_of_stage in enumerate(stages):
        built = [get_num_layers_to_build(config, vp_stage=v, pp_rank=rank) for v in range(virtual)]
        assert built == [layers_of_stage // virtual] * virtual


def test_bad_architecture_names_the_flag():
    with pytest.raises(ValueError, match="--num-query-groups 3"):
        get_preset("tiny").replace(num_query_groups=3)


def test_vocab_padding_matches_megatron_lm():
    # Megatron-LM pads to a multiple of make_vocab_size_divisible_by * TP.
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200


def test_experts_split_over_their_own_tensor_parallel_size():
    """The experts' width is split over --expert-tensor-parallel-size (the dense layers' over
    the TP size), each named in its own message."""
    model = get_preset("tiny").replace(num_experts=4, moe_ffn_hidden_size=6, num_query_groups=4)
    check_parallel_layout(model, 2, 1, expert_tensor_parallel_size=1)
    check_parallel_layout(model, 2, 1, expert_tensor_parallel_size=2)
    with pytest.raises(ValueError, match="--expert-tensor-parallel-size 4 does not divide "
                                         "--moe-ffn-hidden-size 6"):  # fmt: skip
        check_parallel_layout(model, 2, 1, expert_tensor_parallel_size=4)
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 4 does not divide "
                                         "--moe-ffn-hidden-size 6"):  # fmt: skip
        check_parallel_layout(model, 4, 1)


@pytest.mark.parametrize("name", ["tiny", "tinyllama-1.1b"])
def test_mtp_heads_add_a_layer_a_projection_and_logits_each(name):
    """--mtp-num-layers in MFU's FLOPs: each head is one more layer like the last (its
    attention included), its 2h -> h projection and its own logits, forward and backward."""
    arch, seq = get_preset(name), 512
    h, v = arch.hidden_size, arch.vocab_size
    layer = arch.replace(num_layers=arch.num_layers + 1).flops_per_token(seq)
    layer -= arch.flops_per_token(seq)
    head = layer + 3 * (2 * 2 * h * h + 2 * h * v)
    for heads in (1, 3):
        added = arch.flops_per_token(seq, heads) - arch.flops_per_token(seq)
        assert added == pytest.approx(heads * head, rel=1e-12)
