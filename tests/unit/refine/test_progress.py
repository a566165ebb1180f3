"""The progress line: rate and ETA from input bytes."""

import io

from megatron_slm.refine.progress import Progress, hms


def test_hms():
    assert hms(0) == "00:00:00"
    assert hms(3725.4) == "01:02:05"
    assert hms(float("inf")) == "--:--:--"


def test_progress_line_rates_and_eta():
    stream = io.StringIO()
    p = Progress(total_bytes=1000, interval=3600, label="refine", unit="tokens", stream=stream)
    p.start -= 10.0  # ten seconds ago
    p.update(documents=50, tokens=2000, nbytes=250)
    assert stream.getvalue() == ""  # not due yet
    line = p.line(now=p.start + 10.0)
    assert line.startswith("refine:  25.0% 50 docs 5.0 docs/s 200 tokens/s")
    assert line.endswith("elapsed 00:00:10 ETA 00:00:30")  # 3x the time for 3x the bytes left
    p.interval = 0
    p.update(0, 0, 0)
    assert stream.getvalue().startswith("refine:")
