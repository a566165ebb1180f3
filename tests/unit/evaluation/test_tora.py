"""The tool-integrated (ToRA) loop with a scripted model (fixed generations per round): programs
run in the real sandbox, outputs appended in math-evaluation-harness's format, hostile programs
reported as that round's output while the evaluation carries on, and grading end to end through
lm-eval (``gsm8k_rho1_tora`` on a local JSONL, our adapter's ``generate_until``)."""

import json
import re

import pytest

from megatron_slm.evaluation.sandbox import Sandbox, SandboxLimits
from megatron_slm.evaluation.tasks import TASKS_DIR, utils
from megatron_slm.evaluation.tora import MAX_ROUNDS_NOTE, last_program, tool_loop, wants_tool

LIMITS = SandboxLimits(
    wall_seconds=3.0, cpu_seconds=1, memory_bytes=256 << 20, output_bytes=4096, processes=8
)


def code(body: str) -> str:
    return f"Let me compute.\n\n```python\n{body}\n```\n"


# question -> the model's output in each round (what generate_until returns, cut at ```output)
SCRIPT = {
    "How many legs do 6 spiders have?": [
        code("print(6 * 8)"),
        "Six spiders have $\\boxed{48}$ legs.",
    ],
    "What is 7 squared minus 9?": [
        code("while True:\n    pass"),  # loops forever: a timeout, then the model answers
        code("print(7 ** 2 - 9)"),
        "So the result is $\\boxed{40}$.",
    ],
    "What is 3 plus 4?": [
        code("import os\nprint(sorted(os.environ))\nprint('x' * 10 ** 7)"),
        "The answer is $\\boxed{8}$.",  # wrong on purpose
    ],
    "Count to infinity?": [code("print(1)")] * 4,  # never answers: the round limit
}
GOLD = {
    "How many legs do 6 spiders have?": "48",
    "What is 7 squared minus 9?": "40",
    "What is 3 plus 4?": "7",
    "Count to infinity?": "2",  # graded on the last number it printed: 1
}


class Scripted:
    """generate(contexts): the scripted output for each context's question and round; records
    the questions of every call (one call per round)."""

    def __init__(self):
        self.calls = []

    def __call__(self, contexts):
        outs, asked = [], []
        for ctx in contexts:
            question = re.findall(r"Question: (.*?)\n", ctx)[-1]
            solution = ctx.rsplit("Solution:\n", 1)[1]
            outs.append(SCRIPT[question][solution.count("```output")])
            asked.append(question)
        self.calls.append(asked)
        return outs


@pytest.fixture(scope="module")
def box():
    return Sandbox(LIMITS, workers=2)


def test_program_extraction_and_when_to_run():
    text = code("a = 1") + "```output\n1\n```\n" + code("b = 2")
    assert last_program(text) == "b = 2\n"
    assert wants_tool(code("x = 1")) and wants_tool(code("x = 1") + "  \n")
    assert not wants_tool("so \\boxed{3}\n```python\nx\n```")  # an answer ends the loop
    assert not wants_tool("no code here") and last_program("```python\nunclosed") is None


def test_loop_appends_outputs_and_stops_answered_questions(box):
    questions = list(SCRIPT)
    prompts = [f"Question: {q}\n\nSolution:\n" for q in questions]
    model = Scripted()
    done = tool_loop(prompts, model, box.run_many, rounds=3)
    legs, squared, env, forever = done
    legs_answer = SCRIPT[questions[0]][1]
    assert legs == code("print(6 * 8)").rstrip() + "\n```output\n48\n```\n" + legs_answer
    assert squared == (
        code("while True:\n    pass").rstrip()
        + "\n```output\nTimeout Error\n```\n"
        + code("print(7 ** 2 - 9)").rstrip()
        + "\n```output\n40\n```\n"
        + SCRIPT[questions[1]][2]
    )
    out = re.search(r"```output\n(.*?)\n```", env, re.DOTALL).group(1)
    assert "MEGATRON" not in out and len(out) == 403  # cut at the output limit, then to 400
    assert forever.count("```output\n1\n```") == 3 and forever.endswith(MAX_ROUNDS_NOTE)
    # one batched call per round, with only the questions still running
    assert model.calls == [questions, questions, [questions[1], questions[3]]]


def test_gsm8k_tora_end_to_end_through_lm_eval(tmp_path, monkeypatch):
    """lm-eval's task machinery -> our adapter's generate_until (tool_rounds) -> the sandbox ->
    process_results: exact match of each question equals its scripted final answer's."""
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.tasks import TaskManager

    from megatron_slm.evaluation.lm_eval_model import MegatronSLMLM

    data = tmp_path / "gsm8k.jsonl"
    with open(data, "w") as f:
        for q, gold in GOLD.items():
            f.write(json.dumps({"question": q, "answer": f"reasoning\n#### {gold}"}) + "\n")
    model = Scripted()

    class ScriptedLM(MegatronSLMLM):
        def __init__(self):
            TemplateLM.__init__(self)
            self._batch_size, self._max_length, self._max_gen_toks = 8, 4096, 256
            self._hf, self._sandbox_obj = None, Sandbox(LIMITS)

        eot_token_id = 0

        def tok_encode(self, string, **kw):
            return list(string.encode())

        def tok_decode(self, ids):
            return bytes(i for i in ids if i).decode()

        def _generate(self, contexts, until, budget):
            assert "```output" in until and budget == 1024  # the task's generation_kwargs
            return model(list(contexts))

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model=ScriptedLM(),
        tasks=["gsm8k_rho1_tora"],
        task_manager=TaskManager(
            include_path=TASKS_DIR, include_defaults=False, metadata={"gsm8k_path": str(data)}
        ),
        log_samples=True,
        metadata={"gsm8k_path": str(data)},
    )
    samples = {s["doc"]["question"]: s for s in out["samples"]["gsm8k_rho1_tora"]}
    expected = {"How many legs do 6 spiders have?": 1.0, "What is 7 squared minus 9?": 1.0}
    for q in GOLD:
        assert samples[q]["exact_match"] == expected.get(q, 0.0), q
        prompt = samples[q]["arguments"][0][0]
        assert prompt == utils.gsm8k_tora_prompt({"question": q})
        assert prompt.endswith(f"Question: {q}\n\nSolution:\n")
    resp = samples["What is 7 squared minus 9?"]["resps"][0][0]
    assert "```output\nTimeout Error\n```" in resp and "```output\n40\n```" in resp
    assert out["results"]["gsm8k_rho1_tora"]["exact_match,none"] == pytest.approx(0.5)


def test_few_shot_outputs_are_what_their_programs_print():
    """The prompts' examples are honest: each shown output is what the sandbox prints, under the
    limits the evaluator runs them with (the tight test limits timed out importing sympy on a
    loaded CI machine)."""
    box = Sandbox(workers=2)
    for name in ("gsm8k_tora.txt", "math_tora.txt"):
        text = utils._prompt(name)
        pairs = re.findall(r"```python\n(.*?)```\n```output\n(.*?)\n```", text, re.DOTALL)
        assert len(pairs) >= 3
        for result, (_, shown) in zip(box.run_many([p for p, _ in pairs]), pairs):
            assert result.status == "ok" and result.stdout.strip() == shown
        # every example ends in a boxed answer the grader can read
        for block in text.split("\n---\n")[:-1]:
            assert utils.extract_answer(block) and "\\boxed{" in block
