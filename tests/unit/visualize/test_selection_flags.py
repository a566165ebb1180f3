"""The selection facts (``ops.selection``) and the visualizer's trainer-named selection flags."""

import math

import pytest

from megatron_slm.cli import build_parser, parse_configs
from megatron_slm.ops.selection import needs_reference, ratio_error, selects_everything
from megatron_slm.training.config import SLMArgs
from megatron_slm.visualize.config import DynamicsConfig, VisualizeConfig
from megatron_slm.visualize.selection import SelectionSettings, VisualizeError

BASE = ["--load", "ckpt", "--data-path", "d", "--docs", "0", "--output", "o.html"]


def _visualize(argv):
    groups = {"v": VisualizeConfig}
    return parse_configs(build_parser("t", None, groups), groups, BASE + argv)["v"]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, math.nan])
def test_every_ratio_check_is_the_same(ratio):
    msg = ratio_error(ratio)
    assert msg and "(0, 1]" in msg
    with pytest.raises(Exception, match=r"--slm-ratio must be in \(0, 1\]"):
        SLMArgs(slm_ratio=ratio)
    with pytest.raises(VisualizeError, match=r"--slm-ratio must be in \(0, 1\]"):
        VisualizeConfig(load="ckpt", data_path="d", docs="0", output="o.html", slm_ratio=ratio)
    with pytest.raises(VisualizeError, match=r"--slm-ratio must be in \(0, 1\]"):
        DynamicsConfig(checkpoints=["c"], data_path="d", output="o", slm_ratio=ratio)


def test_trainer_names_and_short_names_parse_alike():
    long = _visualize(["--slm-ratio", "0.3", "--slm-select-mode", "loss", "--slm-unscored", "drop"])
    short = _visualize(["--ratio", "0.3", "--select-mode", "loss", "--unscored", "drop"])
    assert (long.slm_ratio, long.slm_select_mode, long.slm_unscored) == (0.3, "loss", "drop")
    assert (short.slm_ratio, short.slm_select_mode, short.slm_unscored) == (0.3, "loss", "drop")


def test_one_definition_of_each_selection_flag():
    """The trainer's and the visualizer's --slm-select-mode/--slm-unscored: the same default,
    choices and help (ops.selection's definitions), and checked when built in Python too."""

    def flags(cls):
        parser = build_parser("t", None, {"g": cls})
        return {a.dest: (a.default, a.choices, a.help) for a in parser._actions}

    trainer, visualizer = flags(SLMArgs), flags(VisualizeConfig)
    for dest in ("slm_select_mode", "slm_unscored"):
        assert trainer[dest] == visualizer[dest] and trainer[dest][1], dest
    with pytest.raises(Exception, match="--slm-select-mode must be one of"):
        SLMArgs(slm_ratio=0.5, slm_select_mode="top")
    with pytest.raises(VisualizeError, match="--slm-unscored must be one of"):
        VisualizeConfig(load="ckpt", data_path="d", docs="0", output="o.html", slm_unscored="x")


@pytest.mark.parametrize(
    "ratio, mode, has_ref, needs, everything",
    [
        (0.6, "excess", True, True, False),
        (0.6, "excess", False, True, True),  # nothing to rank by: the op keeps every token
        (1.0, "excess", False, False, True),
        (0.6, "loss", False, False, False),
        (0.6, "random", True, False, False),
    ],
)
def test_trainer_and_visualizer_agree_on_what_a_setting_means(
    ratio, mode, has_ref, needs, everything
):
    assert needs_reference(ratio, mode) is needs
    assert SLMArgs(slm_ratio=ratio, slm_select_mode=mode).needs_reference is needs
    assert selects_everything(ratio, mode, has_ref) is everything
    # the visualizer ranks by the current loss exactly when the trainer's loss does
    kwargs = SelectionSettings(ratio=ratio, mode=mode).op_kwargs(has_ref)
    assert (kwargs["mode"] == "loss") is (everything or mode == "loss")
