"""Teacher answers -> seeds: grade parsing, ProX's labelling rule at its boundaries, and the
grammar check of chunk programs."""

import pytest

from megatron_slm.refine.seeds import (
    DROP_PROGRAM,
    KEEP_PROGRAM,
    check_chunk_program,
    clean_program,
    doc_label,
    parse_score,
)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The extract is basic.\nScore: 3", 3),
        ("Educational score: **4**/5", 4),
        ("It would score 1 on a good day... Final score = 0", 0),
        ("5", 5),
        ("2.", 2),
        ("Score: 7", None),
        ("Score: 3.5", None),
        ("no idea", None),
        ("", None),
    ],
)
def test_parse_score(answer, expected):
    assert parse_score(answer) == expected


@pytest.mark.parametrize(
    "edu, fmt, label",
    [
        (5, None, KEEP_PROGRAM),
        (3, None, KEEP_PROGRAM),
        (2, 4, KEEP_PROGRAM),
        (2, 5, KEEP_PROGRAM),
        (2, 3, None),
        (2, 0, None),
        (1, None, DROP_PROGRAM),
        (0, None, DROP_PROGRAM),
    ],
)
def test_doc_label(edu, fmt, label):
    assert doc_label(edu, fmt) == label


TEXT = "\n".join(f"line {i} with words" for i in range(8)) + "\nend &amp; more"


def test_clean_program_strips_fences_and_header():
    answer = "```python\nProgram:\n  remove_lines(line_start=1, line_end=2)  \n\n```"
    assert clean_program(answer) == "remove_lines(line_start=1, line_end=2)"


@pytest.mark.parametrize(
    "program, ok",
    [
        ("remove_lines(line_start=4, line_end=5)", True),
        ('remove_lines(start=4, end=4)\nnormalize(source_str="&amp;", target_str="&")', True),
        ("keep_chunk()", True),
        ("remove_lines(line_start=3, line_end=5)", False),  # line 3 is outside the chunk 4..8
        ("remove_lines(line_start=8, line_end=9)", False),  # past the chunk (and the document)
        ("remove_lines(all=True)", False),
        ('normalize(source_str="line 0", target_str="")', False),  # not in this chunk
        ("keep_chunk()\nremove_lines(line_start=4, line_end=4)", False),
        ("remove_lines(line_start=5, line_end=4)", False),
        ("delete everything", False),
        ("", False),
    ],
)
def test_check_chunk_program(program, ok):
    reason = check_chunk_program(program, TEXT, 4, 8)
    assert (reason is None) == ok, reason
