import dataclasses

import pytest

from megatron_slm.models import PRESETS, check_parallel_layout, get_preset, padded_vocab_size


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


def test_bad_architecture_names_the_flag():
    with pytest.raises(ValueError, match="--num-query-groups 3"):
        get_preset("tiny").replace(num_query_groups=3)


def test_vocab_padding_matches_megatron_lm():
    # Megatron-LM pads to a multiple of make_vocab_size_divisible_by * TP.
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
