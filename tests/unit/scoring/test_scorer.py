"""The --dry-run estimate (``scoring.scorer.dry_run_estimate``), against hand-computed times."""

from __future__ import annotations

import pytest

from megatron_slm.scoring.scorer import dry_run_estimate


def test_the_rest_is_timed_at_the_second_rounds_rate():
    # Round 1: 1000 tokens in 10 s (packing + warm-up); round 2: 1000 more in 2 s (500 tokens/s).
    # 10,000 tokens left: 10 s for the first 1000, then 9000 / 500 = 18 s.
    seconds, steady = dry_run_estimate([(10.0, 1000), (12.0, 2000)], 10_000)
    assert steady == pytest.approx(500.0)
    assert seconds == pytest.approx(28.0)
    # The old estimate (all of it at the two rounds' mean rate, 2000 / 12 tokens/s) said 60 s.
    assert seconds < 10_000 / (2000 / 12)


def test_one_round_is_timed_at_its_own_rate():
    seconds, steady = dry_run_estimate([(4.0, 800)], 2000)
    assert steady is None and seconds == pytest.approx(10.0)
    # A corpus no larger than the first round: that round's time, pro rata.
    seconds, steady = dry_run_estimate([(4.0, 800), (5.0, 1600)], 400)
    assert steady is None and seconds == pytest.approx(2.0)


def test_a_second_round_with_no_tokens_or_no_time_falls_back_to_the_first():
    for marks in ([(4.0, 800), (6.0, 800)], [(4.0, 800), (4.0, 1600)]):
        seconds, steady = dry_run_estimate(marks, 2000)
        assert steady is None and seconds == pytest.approx(10.0)
    assert dry_run_estimate([(1.0, 0)], 0) == (0.0, None)
