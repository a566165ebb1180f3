"""Prompt building, answer extraction and segmenting (no model)."""

import pytest

from megatron_slm.evaluation import FewShotConfig, build_prompt, extract_answer, segments
from megatron_slm.evaluation.fewshot import cut_at_stop, normalize


def test_build_prompt():
    cfg = FewShotConfig(num_shots=1)
    shots = [{"question": "1+1?", "answer": "2"}]
    assert (
        build_prompt("2+2?", shots, cfg) == "Question: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:"
    )


@pytest.mark.parametrize(
    "text, rule, expected",
    [
        ("  blue\nmore", "first-line", "blue"),
        ("\n\n red ", "first-line", "red"),
        (" so 3 + 4 = 7.\n", "last-number", "7"),
        ("It costs 1,250 dollars and 3", "first-number", "1250"),
        ("The answer is (B).", r"regex:\(([A-D])\)", "B"),
        ("no match", r"regex:\(([A-D])\)", ""),
        ("#### 42", "last-number", "42"),
        ("  x  ", "strip", "x"),
    ],
)
def test_extraction_rules(text, rule, expected):
    assert extract_answer(text, rule) == expected


def test_stop_and_normalize():
    assert cut_at_stop(" blue\nQuestion:", ("\n",)) == (" blue", True)
    assert cut_at_stop(" blue", ("\n",)) == (" blue", False)
    assert normalize("  The   Lazy dog ", ignore_case=True) == "the lazy dog"


def test_bad_settings():
    with pytest.raises(ValueError, match="--answer-extraction"):
        FewShotConfig(answer_extraction="nonsense")
    with pytest.raises(ValueError, match="--prompt-template"):
        FewShotConfig(prompt_template="no placeholder")


def test_segments_cover_every_token_once():
    doc = list(range(10))
    segs = list(segments(doc, 4))
    assert segs == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9]]
    predicted = [t for s in segs for t in s[1:]]
    assert predicted == doc[1:]
    assert list(segments([5], 4)) == []
