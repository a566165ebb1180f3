"""Token-loss dynamics and the learning-curve arithmetic against hand computations on small fixed
inputs; the plots are valid PNGs of the stated size."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from megatron_slm.visualize.colors import excess_rgb, scale_limit
from megatron_slm.visualize.curve import speedup, tokens_to_reach
from megatron_slm.visualize.dynamics import (
    CATEGORIES,
    category_summary,
    checkpoint_step,
    default_threshold,
    plot_dynamics,
)

# 3 checkpoints x 8 tokens; theta = 2.0 (high: loss > 2.0)
LOSSES = np.array(
    [
        [3.0, 2.5, 1.0, 0.5, 4.0, 2.0, 1.5, 3.5],
        [2.8, 1.9, 1.9, 0.4, 3.9, 2.6, 1.2, 2.1],
        [2.6, 1.0, 2.4, 0.3, 3.8, 3.0, 1.0, 1.5],
    ]
)
# by hand, first -> last:      H->H  H->L  L->H  L->L  H->H  L->H  L->L  H->L
HAND = {"H->H": [0, 4], "L->H": [2, 5], "H->L": [1, 7], "L->L": [3, 6]}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_categories_equal_hand_computation():
    summary = category_summary(LOSSES, 2.0)
    assert list(summary) == list(CATEGORIES)
    for cat, members in HAND.items():
        assert summary[cat]["count"] == len(members)
        assert summary[cat]["share"] == pytest.approx(len(members) / 8)
        hand_curve = [sum(LOSSES[c, i] for i in members) / len(members) for c in range(3)]
        assert summary[cat]["mean_loss"] == pytest.approx(hand_curve)


def test_threshold_boundary_is_low_and_subsets():
    # 2.0 exactly is "low" (high means strictly above): token 5 starts low.
    assert category_summary(LOSSES[:, [5]], 2.0)["L->H"]["count"] == 1
    mask = np.array([True, True, False, False, True, False, False, False])
    sub = category_summary(LOSSES, 2.0, mask)  # tokens 0, 1, 4
    assert (sub["H->H"]["count"], sub["H->L"]["count"], sub["L->L"]["count"]) == (2, 1, 0)
    assert sub["H->H"]["share"] == pytest.approx(2 / 3)
    assert sub["L->L"]["mean_loss"] == [None] * 3
    assert default_threshold(LOSSES) == pytest.approx(np.median(LOSSES[0]))


def test_plot_is_png_of_stated_size():
    summary = category_summary(LOSSES, 2.0)
    mask = np.arange(8) % 2 == 0
    split = {"selected": category_summary(LOSSES, 2.0, mask),
             "unselected": category_summary(LOSSES, 2.0, ~mask)}  # fmt: skip
    for sp, (w, h) in ((None, (640, 360)), (split, (900, 400))):
        assert _png_size(plot_dynamics([0, 50, 100], summary, sp, w, h)) == (w, h)


def test_checkpoint_step_and_curve_arithmetic():
    assert checkpoint_step("out/slm/iter_0000150", 7) == 150
    assert checkpoint_step("out/somewhere", 7) == 7
    # Linear interpolation between (100, 3.0) and (200, 2.0) for the level 2.5 -> 150 tokens.
    points = [(0, 5.0), (100, 3.0), (200, 2.0)]
    assert tokens_to_reach(points, 2.5) == pytest.approx(150.0)
    assert tokens_to_reach(points, 5.5) == 0.0
    assert tokens_to_reach(points, 1.0) is None
    result = speedup({"plain": [(100, 3.0), (400, 2.5)], "rho1": points}, "plain")
    assert result["baseline_final_loss"] == 2.5
    assert result["runs"]["rho1"]["tokens_to_baseline_final_loss"] == pytest.approx(150.0)
    assert result["runs"]["rho1"]["speedup"] == pytest.approx(400 / 150)
    assert result["runs"]["plain"]["speedup"] == pytest.approx(1.0)


def test_diverging_scale():
    assert scale_limit([np.array([np.nan, -4.0, 1.0, 2.0])], quantile=1.0) == 4.0
    assert excess_rgb(0.0, 1.0) == (247, 247, 247)
    assert excess_rgb(5.0, 1.0) == (178, 24, 43)  # clipped to the red end
    assert excess_rgb(-1.0, 1.0) == (33, 102, 172)
    red, blue = excess_rgb(0.5, 1.0), excess_rgb(-0.5, 1.0)
    assert red[0] > red[2] and blue[2] > blue[0]
    assert excess_rgb(float("nan"), 1.0) == (200, 200, 200)
