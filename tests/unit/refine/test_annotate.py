"""Seed annotation with a scripted in-process teacher: labels, resume from the journal (a torn
last line included), another run's journal refused, bad input naming the flag / file and line."""

import json
import os
import sys

import pytest

from megatron_slm.refine.annotate import annotate
from megatron_slm.refine.annotate_config import AnnotateConfig, AnnotateError
from megatron_slm.refine.prompts import chat_messages
from tests.unit.refine import REPO


class Teacher:
    """Grades from ``EDU=n`` / ``FMT=n`` markers; counts what it is asked."""

    retries = 0

    def __init__(self):
        self.asked = []

    def answer_all(self, requests, max_tokens, on_answer):
        for key, messages in requests:
            content = messages[-1]["content"]
            self.asked.append(content)
            if "NOPE" in content:
                on_answer(key, None, "not a chat completion")
                continue
            key_name = "EDU" if "educational value" in content else "FMT"
            grade = content.split(key_name + "=", 1)[1][0]
            on_answer(key, f"Reasons.\nScore: {grade}", None)


DOCS = [
    ("a", "EDU=3 the cell"),
    ("b", "EDU=1 buy now"),
    ("c", "EDU=2 FMT=4 tidy"),
    ("d", "EDU=2 FMT=3 messy"),
    ("e", "NOPE"),
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCS))
    return str(path), str(tmp_path / "seeds.jsonl")


def config(inp, out, **kw):
    return AnnotateConfig(input=[inp], stage="doc", teacher="/nonexistent", output=out, **kw)


def test_labels_and_resume(corpus):
    inp, out = corpus
    teacher = Teacher()
    stats = annotate(config(inp, out), log=lambda m: None, teacher=teacher)
    assert len(teacher.asked) == 5 + 2  # edu for all, format for the two edu = 2
    seeds = [json.loads(line) for line in open(out)]
    assert [(s["id"], s["messages"]) for s in seeds] == [
        ("a", chat_messages("EDU=3 the cell", "keep_doc()")),
        ("b", chat_messages("EDU=1 buy now", "drop_doc()")),
        ("c", chat_messages("EDU=2 FMT=4 tidy", "keep_doc()")),
    ]
    assert stats["labels"] == {"keep": 2, "drop": 1, "excluded": 1} and stats["malformed"] == 1
    # a complete rerun asks nothing and writes the same bytes
    first = open(out, "rb").read()
    again = Teacher()
    assert annotate(config(inp, out), log=lambda m: None, teacher=again)["requests_sent"] == 0
    assert again.asked == [] and open(out, "rb").read() == first
    # a torn last journal line (a kill mid-write) is cut off; only that request is sent again
    journal = out + ".journal"
    lines = open(journal, "rb").read().splitlines(keepends=True)
    with open(journal, "wb") as f:
        f.writelines(lines[:-1])
        f.write(lines[-1][:10])
    again = Teacher()
    annotate(config(inp, out), log=lambda m: None, teacher=again)
    assert len(again.asked) == 1 and open(out, "rb").read() == first


def test_another_runs_journal_is_refused(corpus, tmp_path):
    inp, out = corpus
    annotate(config(inp, out), log=lambda m: None, teacher=Teacher())
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("doc_edu.txt", "doc_format.txt"):
        src = os.path.join(REPO, "megatron_slm", "refine", "prompts", name)
        (prompts / name).write_text(open(src).read() + "\nBe strict.")
    with pytest.raises(AnnotateError, match=r"--output: .*journal.*another run.*prompts"):
        annotate(config(inp, out, prompts_dir=str(prompts)), log=lambda m: None, teacher=Teacher())


def test_prompts_ship_in_the_package():
    setup = open(os.path.join(REPO, "setup.py")).read()
    assert '"megatron_slm.refine": ["prompts/*.txt"]' in setup
    names = os.listdir(os.path.join(REPO, "megatron_slm", "refine", "prompts"))
    assert {"doc_edu.txt", "doc_format.txt", "chunk_program.txt"} <= set(names)


def run_tool(argv, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import prox_annotate
    finally:
        sys.path.pop(0)
    code = prox_annotate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return code, err[0]


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    out = str(tmp_path / "s.jsonl")
    base = ["--stage", "doc", "--teacher", "http://127.0.0.1:9/v1", "--teacher-model", "m"]
    code, line = run_tool(["--input", str(bad), "--output", out, *base], capsys)
    assert code == 2 and line == f"prox_annotate: error: {bad}:2: no 'text' key (--text-key)"
    code, line = run_tool(["--input", str(bad), "--output", out, "--stage", "chunk",
                           "--teacher", str(tmp_path)], capsys)  # fmt: skip
    assert code == 2 and "--stage chunk needs --tokenizer" in line
    code, line = run_tool(["--input", str(bad), "--output", out, "--stage", "doc",
                           "--teacher", "http://127.0.0.1:9/v1"], capsys)  # fmt: skip
    assert code == 2 and "--teacher-model" in line
