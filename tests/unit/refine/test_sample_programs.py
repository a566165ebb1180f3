"""The programs shipped next to the sample corpus (the quickstart's ProX step)."""

import json
import os
import re

from megatron_slm.refine.config import ApplyConfig, RunConfig
from megatron_slm.refine.pipeline import refine_corpus
from tests import zygote

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
SAMPLE = os.path.join(REPO, "examples", "sample_data")
NOISE = [
    "Home | About",
    "Click here to subscribe",
    "Copyright 2024",
    "Share on Facebook",
]


def test_shipped_programs_are_up_to_date(tmp_path):
    import sys

    out = tmp_path / "programs.jsonl"
    zygote.run(
        [sys.executable, os.path.join(SAMPLE, "make_prox_programs.py"), "--output", str(out)],
        check=True,
    )
    with open(os.path.join(SAMPLE, "noisy_programs.jsonl"), "rb") as f:
        assert out.read_bytes() == f.read()


def test_applying_them_removes_the_noise(tmp_path):
    refine_corpus(
        RunConfig(input=[os.path.join(SAMPLE, "noisy.jsonl")], output_dir=str(tmp_path)),
        ApplyConfig(programs=os.path.join(SAMPLE, "noisy_programs.jsonl")),
        rank=0, world_size=1, log=lambda *_: None,
    )  # fmt: skip
    with open(tmp_path / "noisy.jsonl") as f:
        kept = [json.loads(line) for line in f]
    stats = json.load(open(tmp_path / "stats.json"))["totals"]
    assert stats["documents"] == 1600 and stats["program_errors"] == 0
    # every document has noise lines; one in ten is a spam page, and a few more are mostly noise
    assert stats["decisions"]["drop_doc"] == stats["dropped"] >= 0.1 * 1600 * 0.8
    assert stats["decisions"].get("refined", 0) + stats["dropped"] == 1600
    for record in kept:
        text = record["text"]
        assert not any(n in text for n in NOISE), text
        assert not re.search(r"\b[0-9a-f]{16,}\b", text), text
        assert "  " not in text and text == text.strip()
        # what is left is the clean generator's lines: questions with answers, and facts
        for line in text.split("\n"):
            assert line.split()[0] in ("Question:", "The", "Water", "A", "Plants", "Sound"), text
