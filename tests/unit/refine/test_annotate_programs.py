"""``prox_annotate --programs``: seeds distilled from existing programs (the ``prox_refine apply``
format). Chunk programs are cut from the document-wide program; the cut is checked against the
executor: applying every chunk's program to its own lines gives the document program's result."""

import json
import os
import random
import sys

import pytest

import megatron_slm.refine.annotate as annotate_module
from megatron_slm.errors import ConfigError
from megatron_slm.refine.annotate import annotate
from megatron_slm.refine.annotate_config import AnnotateConfig, AnnotateError
from megatron_slm.refine.chunking import split_into_chunks, wrap_chunk
from megatron_slm.refine.executor import apply_chunk_program
from megatron_slm.refine.program import Normalize, RemoveLines, parse_program
from megatron_slm.refine.prompts import chat_messages
from megatron_slm.refine.seeds import check_chunk_program, chunk_part, render_call
from tests import zygote
from tests.unit.refine import REPO, read_jsonl, write_jsonl


class WordTokenizer:
    """One token per whitespace-separated word: chunk boundaries computed by hand."""

    def __call__(self, texts, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [[0] * len(t.split()) for t in texts]}


def count(lines):
    return [len(line.split()) for line in lines]


MAX_TOKENS = 9  # "[000]line 0 w" = 3 words: three lines per chunk
TEXT = "\n".join(f"line {i} " + ("alpha" if i == 0 else f"w{i}") for i in range(10))
# chunks: 0..2, 3..5, 6..8, 9..9
PROGRAM = "\n".join(
    [
        "remove_lines(line_start=2, line_end=4)",  # over the first two chunks
        'normalize(source_str="alpha", target_str="ALPHA")',  # only in the first chunk
        "keep_chunk()",  # no effect on a whole document
        "remove_lines(9, 9)",
    ]
)


@pytest.fixture
def tokenizer(monkeypatch):
    monkeypatch.setattr(annotate_module, "_load_tokenizer", lambda path: WordTokenizer())


def run(tmp_path, stage, docs, programs, **kw):
    inp, prog, out = (str(tmp_path / n) for n in ("docs.jsonl", "programs.jsonl", "seeds.jsonl"))
    write_jsonl(inp, [{"id": i, "text": t} for i, t in docs])
    write_jsonl(prog, [{"id": i, "doc_program": d, "chunk_program": c} for i, d, c in programs])
    if stage == "chunk":
        kw = {"tokenizer": "stub", "chunk_max_tokens": MAX_TOKENS, **kw}
    config = AnnotateConfig(input=[inp], stage=stage, programs=prog, output=out, **kw)
    logged = []
    stats = annotate(config, log=logged.append)
    assert json.load(open(out + ".stats.json")) == stats and len(logged) == 1
    return stats, read_jsonl(out), inp


def refine_by_chunks(text, seeds):
    """Each seed's program run on its own chunk only (the lines before it blank, so the numbers
    are the document's), the refined chunks joined."""
    lines = []
    for seed in seeds:
        first, last = seed["metadata"]["lines"]
        padded = "\n" * first + "\n".join(text.split("\n")[first : last + 1])
        refined, errors, removed, _ = apply_chunk_program(padded, seed["messages"][-1]["content"])
        assert errors == []
        if removed < last - first + 1:
            lines += refined.split("\n")[first:]
    return "\n".join(lines)


def test_chunk_seeds_are_the_document_program_cut_per_chunk(tmp_path, tokenizer):
    stats, seeds, inp = run(tmp_path, "chunk", [("a", TEXT)], [("a", None, PROGRAM)])
    chunks, _ = split_into_chunks(TEXT, count, MAX_TOKENS)
    assert [(c.first_line, c.last_line) for c in chunks] == [(0, 2), (3, 5), (6, 8), (9, 9)]
    expected = [
        'remove_lines(line_start=2, line_end=2)\nnormalize(source_str="alpha", target_str="ALPHA")',
        "remove_lines(line_start=3, line_end=4)",
        "keep_chunk()",
        "remove_lines(line_start=9, line_end=9)",
    ]
    assert seeds == [
        {
            "messages": chat_messages(wrap_chunk(c.body), p),
            "metadata": {
                "stage": "chunk",
                "source": f"{inp}:1",
                "lines": [c.first_line, c.last_line],
            },
            "id": "a",
        }
        for c, p in zip(chunks, expected)
    ]
    assert refine_by_chunks(TEXT, seeds) == apply_chunk_program(TEXT, PROGRAM)[0]
    assert stats["chunks"] == 4 and stats["seeds"] == 4 and stats["malformed"] == 0


def test_random_programs_refine_the_same_by_chunks(tmp_path, tokenizer):
    rng = random.Random(0)
    docs, programs = [], []
    for d in range(20):
        n = rng.randint(1, 25)
        lines = [
            " ".join(f"t{rng.randint(0, 30)}" for _ in range(rng.randint(1, 3))) for _ in range(n)
        ]
        calls = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.5:
                start = rng.randint(0, n - 1)
                calls.append(f"remove_lines({start}, {rng.randint(start, n - 1)})")
            else:  # targets never contain a source: per-chunk order cannot matter
                calls.append(f'normalize("t{rng.randint(0, 30)} ", "X{rng.randint(0, 9)} ")')
        docs.append((d, "\n".join(lines)))
        programs.append((d, None, "\n".join(calls)))
    stats, seeds, _ = run(tmp_path, "chunk", docs, programs)
    assert stats["malformed"] == 0 and stats["seeds"] == stats["chunks"] > len(docs)
    for (d, text), (_, _, program) in zip(docs, programs):
        mine = [s for s in seeds if s["id"] == d]
        assert refine_by_chunks(text, mine) == apply_chunk_program(text, program)[0]


def test_null_malformed_and_invalid_chunk_programs(tmp_path, tokenizer):
    docs = [("null", TEXT), ("bad", TEXT), ("empty", TEXT), ("join", "x\ny\nz"), ("blank", " ")]
    programs = [
        ("null", "keep_doc()", None),
        ("bad", None, "remove_lines(line_start=5, line_end=2)"),
        ("empty", None, "\n"),
        # the joined lines make line 2 fall past the end of the normalized document
        ("join", None, 'normalize(source_str="y\\nz", target_str="yz")\nremove_lines(2, 2)'),
        ("blank", None, "remove_lines(0, 0)"),  # an empty document is never sent
    ]
    stats, seeds, _ = run(tmp_path, "chunk", docs, programs, chunk_max_tokens=100)
    assert seeds == [] and stats["documents_excluded"] == 1
    assert stats["malformed_reasons"] == {
        "chunk_program: reversed range 5..2": 1,
        "chunk_program: empty program": 1,
    }
    assert stats["programs_invalid"] == 1 and stats["malformed"] == 3
    assert list(stats["invalid_reasons"]) == ["range 2..2 outside the document"]


def test_doc_seeds_labels_null_and_malformed(tmp_path):
    docs = [("k", "good"), ("d", "spam"), ("u", "old"), ("n", "unsure"), ("x", "bad"), ("m", "two")]
    programs = [
        ("k", "keep_doc()", "remove_lines(0, 0)"),
        ("d", "drop_doc()", None),
        ("u", "untouch_doc()", None),
        ("n", None, None),
        ("x", "remove_lines(0, 0)", None),
        ("m", "keep_doc()\ndrop_doc()", None),
    ]
    stats, seeds, inp = run(tmp_path, "doc", docs, programs)
    assert seeds == [
        {
            "messages": chat_messages(t, a),
            "metadata": {"stage": "doc", "source": f"{inp}:{n}"},
            "id": i,
        }
        for n, (i, t), a in [
            (1, docs[0], "keep_doc()"),
            (2, docs[1], "drop_doc()"),
            (3, docs[2], "keep_doc()"),
        ]
    ]
    assert stats["labels"] == {"keep": 2, "drop": 1, "excluded": 1}
    assert stats["malformed_reasons"] == {
        "doc_program: unknown doc-level function 'remove_lines'": 1,
        "doc_program: more than one call": 1,
    }


def test_missing_id_names_the_input_line(tmp_path):
    with pytest.raises(
        AnnotateError, match=r"docs\.jsonl:2: no program for id \"b\" in .*programs\.jsonl"
    ):
        run(tmp_path, "doc", [("a", "x"), ("b", "y")], [("a", "keep_doc()", None)])


def test_teacher_and_programs_exactly_one():
    for extra in ({}, {"teacher": "http://h/v1", "teacher_model": "m", "programs": "p.jsonl"}):
        with pytest.raises(ConfigError, match="exactly one of --teacher .* and --programs"):
            AnnotateConfig(input=["x"], stage="doc", output="o", **extra)


@pytest.mark.parametrize(
    "source, target",
    [
        ('say "hi", then (x=1)', "a\\b \\n"),
        ("tab\there\nnew line\r", ""),
        ("caf\u00e9 \u2028 \x85 \x00 \U0001f600", "\u00e9'\"'"),
        ("remove_lines(line_start=1, line_end=2)", "} {"),
    ],
)
def test_rendered_calls_parse_back(source, target):
    for op in (Normalize(source, target), RemoveLines(3, 7)):
        line = render_call(op)
        assert parse_program(line, "chunk").operations == [(1, op)], line
    text = f"a\n{source}\nb"
    part = chunk_part(
        parse_program(render_call(Normalize(source, target)), "chunk").operations, text, 0, 2
    )
    assert check_chunk_program(part, text, 0, 2) is None


def test_cli(tmp_path, capsys):
    inp, prog, out = (str(tmp_path / n) for n in ("docs.jsonl", "programs.jsonl", "seeds.jsonl"))
    write_jsonl(inp, [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}])
    write_jsonl(
        prog, [{"id": 1, "doc_program": "keep_doc()"}, {"id": 2, "doc_program": "drop_doc()"}]
    )
    tool = os.path.join(REPO, "tools", "prox_annotate.py")
    argv = [
        sys.executable,
        tool,
        "--input",
        inp,
        "--stage",
        "doc",
        "--programs",
        prog,
        "--output",
        out,
    ]
    done = zygote.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 seeds from the programs in" in done.stderr
    assert [s["messages"][-1]["content"] for s in read_jsonl(out)] == ["keep_doc()", "drop_doc()"]
    assert json.load(open(out + ".stats.json"))["labels"] == {"keep": 1, "drop": 1, "excluded": 0}
    # bad input: exit status 2, one line (in-process: one interpreter start is enough)
    write_jsonl(prog, [{"id": 1, "doc_program": "keep_doc()"}])
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import prox_annotate
    finally:
        sys.path.pop(0)
    assert prox_annotate.main(argv[2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"prox_annotate: error: {inp}:2: no program for id 2 in {prog}"]


def test_ranges_to_the_end_and_past_it_are_clipped():
    ops = parse_program("remove_lines(all=True)\nremove_lines(8, 20)", "chunk").operations
    assert chunk_part(ops, TEXT, 3, 5) == "remove_lines(line_start=3, line_end=5)"
    assert chunk_part(ops, TEXT, 9, 9) == (
        "remove_lines(line_start=9, line_end=9)\nremove_lines(line_start=9, line_end=9)"
    )


def test_doc_user_message_is_truncated_as_at_inference(tmp_path, monkeypatch):
    from megatron_slm.refine.prompts import doc_message
    from tests.unit.refine.test_prompts import OVERHEAD, TOK

    monkeypatch.setattr(annotate_module, "_load_tokenizer", lambda path: TOK)
    text = "a long document\n" * 20
    _, seeds, _ = run(
        tmp_path, "doc", [("a", text)], [("a", "keep_doc()", None)],
        tokenizer="stub", doc_max_prompt_tokens=OVERHEAD + 40,
    )  # fmt: skip
    user = doc_message(TOK, text, OVERHEAD + 40)[0]
    assert len(user) < len(text) and seeds[0]["messages"] == chat_messages(user, "keep_doc()")
