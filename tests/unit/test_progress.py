"""The progress line: done/total, a rate that never rounds a slow job to 0, and the ETA."""

import io
import re

from megatron_slm.progress import ProgressBar, hms, rate_text


def test_rate_text_keeps_slow_rates_readable():
    assert rate_text(1 / 60) == "0.0167"
    assert rate_text(48.54) == "48.5"
    assert rate_text(2112.4) == "2,112"
    assert rate_text(0.0) == "0"


def test_progress_line_rate_and_eta_agree_with_the_clock():
    out = io.StringIO()
    bar = ProgressBar("job", 10, "checkpoints", stream=out)
    bar.start -= 120.0  # two minutes in, 2 of 10 done: 1 per minute, 8 minutes left
    bar.update(2, final=True)
    line = out.getvalue().strip().splitlines()[-1]
    rate = float(re.search(r"\| ([0-9.]+) checkpoints/s", line).group(1))
    assert abs(rate - 1 / 60) < 1e-3, line
    assert f"ETA {hms(480)}" in line or f"ETA {hms(479)}" in line, line
