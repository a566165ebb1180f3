"""Rho-1 math answer extraction and comparison on hand-written model outputs, and the shipped
lm-eval task configs (prompts, gold answers, scoring) on local records."""

import os

import pytest

from megatron_slm.evaluation.math_answer import extract_answer, is_equiv, normalize_answer
from megatron_slm.evaluation.tasks import TASKS_DIR


@pytest.mark.parametrize(
    "output, expected",
    [
        # boxed, nested braces, the last box wins
        ("so $x = \\boxed{\\frac{211}{243}}$.\nThe answer is \\frac{211}{243}", "\\frac{211}{243}"),
        ("first \\boxed{3} then \\boxed{\\sqrt{2}}.", "\\sqrt{2}"),
        ("$a+d=\\boxed{0}$", "0"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac12}", "\\frac{1}{2}"),
        ("\\boxed{10\\%}", "10"),
        ("\\boxed{90^\\circ}", "90"),
        ("\\boxed{x=5}", "5"),
        ("\\boxed{\\text{(C)}}", "(C)"),
        # "The answer is", negatives, units, commas, trailing dots
        ("5 x 3 = 15. 23 - 15 is 8. The answer is 8.", "8"),
        ("It fell by 7 degrees. The answer is -7.", "-7"),
        ("The answer is $1,250.", "1250"),
        ("The answer is 18 dollars.", "18"),
        ("The answer is 42 \\text{ cm}.\n\nQuestion: next", "42"),
        ("The answer is 3/4", "\\frac{3}{4}"),
        ("The answer is -2/3.", "\\frac{-2}{3}"),
        ("The answer is 2.50.", "2.5"),
        ("The answer is 6.0", "6"),
        ("The answer is .5", "0.5"),
        # no box, no phrase: the last number (commas dropped)
        ("35 + 18 = 53. Ivan has 53 marbles.", "53"),
        ("it costs 1,000,000 in total", "1000000"),
        ("temperature went to -12 overnight", "-12"),
        ("no number here", ""),
    ],
)
def test_extract_answer(output, expected):
    assert extract_answer(output) == expected


@pytest.mark.parametrize(
    "a, b, equal",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{-2}{3}", "-\\frac{2}{3}", True),
        ("1250", "1250.0", True),
        ("\\frac{211}{243}", "\\frac{211}{243}", True),
        ("63\\pi", "63\\pi", True),
        ("-7", "7", False),
        ("\\frac{1}{3}", "0.33", False),
        ("", "", False),
    ],
)
def test_is_equiv(a, b, equal):
    assert is_equiv(normalize_answer(a), normalize_answer(b)) is equal


def _task_utils():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rho1_utils", os.path.join(TASKS_DIR, "utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_prompts_and_scoring():
    utils = _task_utils()
    gsm = {"question": "Ann has 3 apples and eats 5. How many?", "answer": "3 - 5 = -2\n#### -2"}
    prompt = utils.gsm8k_prompt(gsm)
    assert prompt.count("Question:") == 9 and prompt.count("The answer is") == 8
    assert prompt.endswith(f"Question: {gsm['question']}\nAnswer:")
    assert utils.gsm8k_gold(gsm) == "-2"
    assert utils.process_results(gsm, [" 3 - 5 = -2. The answer is -2."]) == {"exact_match": 1.0}
    assert utils.process_results(gsm, [" The answer is 2."]) == {"exact_match": 0.0}
    math_doc = {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}
    prompt = utils.math_prompt(math_doc)
    assert prompt.count("\\boxed") == 4 and prompt.endswith("Question: Half of one?\nAnswer:")
    assert utils.process_results(math_doc, ["so \\boxed{0.5}"]) == {"exact_match": 1.0}
    qa = {"question": "Jun has 8 stamps and gives 6. Left?", "answer": "8 - 6 = 2. Jun has 2."}
    assert utils.process_results(qa, [" 8 - 6 = 2. Jun has 2 stamps left."]) == {"exact_match": 1.0}


def test_local_jsonl_and_missing_file(tmp_path):
    utils = _task_utils()
    path = tmp_path / "gsm.jsonl"
    path.write_text('{"question": "q", "answer": "x\\n#### 4"}\n')
    data = utils.load_gsm8k(gsm8k_path=str(path), version=1.0)
    assert data["test"][0]["answer"].endswith("#### 4")
    with pytest.raises(ValueError, match="gsm8k_path"):
        utils.load_gsm8k(gsm8k_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="qa_path"):
        utils.load_qa()
