"""The ProX program parser: spellings, literal arguments, and one error per bad line."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_slm.refine.program import (
    DropDoc,
    Keep,
    Normalize,
    ProgramError,
    RemoveLines,
    parse_program,
)


def ops(text, stage="chunk"):
    program = parse_program(text, stage)
    return [op for _, op in program.operations], program.errors


@pytest.mark.parametrize(
    "line, expected",
    [
        ("remove_lines(line_start=3, line_end=7)", RemoveLines(3, 7)),
        ("remove_lines(line_start=3,line_end=7)", RemoveLines(3, 7)),
        ("remove_lines(start=3, end=7)", RemoveLines(3, 7)),
        ("remove_lines(3, 7)", RemoveLines(3, 7)),
        ("remove_lines(3, line_end=7)", RemoveLines(3, 7)),
        ("remove_lines(line_end=7, line_start=3)", RemoveLines(3, 7)),
        ("  remove_lines( line_start = 0 , line_end = 0 )  ", RemoveLines(0, 0)),
        ("remove_lines(all=True)", RemoveLines(0, None)),
        ("keep_chunk()", Keep()),
        ("untouch_doc()", Keep()),
        ('normalize(source_str="a", target_str="b")', Normalize("a", "b")),
        ("normalize(source_str='a', target_str='b')", Normalize("a", "b")),
        ('normalize("a", "b")', Normalize("a", "b")),
        ('normalize(source="a", target="b")', Normalize("a", "b")),
        ('normalize(source_str="gone")', Normalize("gone", "")),
    ],
)
def test_chunk_spellings(line, expected):
    assert ops(line) == ([expected], [])


@pytest.mark.parametrize(
    "line, source, target",
    [
        # the cases string slicing gets wrong: commas, '=', ')' and quotes inside the strings
        ('normalize(source_str="a, b", target_str="c")', "a, b", "c"),
        ('normalize(source_str="x=1", target_str="y = 2")', "x=1", "y = 2"),
        ('normalize(source_str="f(x)", target_str=")")', "f(x)", ")"),
        ('normalize(source_str="say \\"hi\\"", target_str=\'it\\\'s\')', 'say "hi"', "it's"),
        ('normalize(source_str="tab\\there", target_str="nl\\n")', "tab\there", "nl\n"),
        ('normalize(source_str="\\u00e9t\\u00e9", target_str="ete")', "été", "ete"),
        ('normalize(source_str="日本", target_str="")', "日本", ""),
        ("normalize(source_str='''tri\"ple''', target_str=\"\")", 'tri"ple', ""),
    ],
)
def test_normalize_string_literals(line, source, target):
    assert ops(line) == ([Normalize(source, target)], [])


def test_doc_spellings():
    assert ops("drop_doc()", "doc") == ([DropDoc()], [])
    assert ops("keep_doc()", "doc") == ([Keep()], [])
    assert ops("untouch_doc()", "doc") == ([Keep()], [])


@pytest.mark.parametrize(
    "line, reason",
    [
        ("remove_lines(line_start=7, line_end=3)", "reversed range 7..3"),
        ("remove_lines(7, 3)", "reversed range 7..3"),
        ("remove_lines(line_start=-1, line_end=3)", "line_start must be >= 0"),
        ("remove_lines(line_start=1.5, line_end=3)", "line_start must be an integer"),
        ("remove_lines(line_start=True, line_end=3)", "line_start must be an integer"),
        ("remove_lines(line_start='1', line_end=3)", "line_start must be an integer"),
        ("remove_lines(line_start=1)", "needs line_start and line_end"),
        ("remove_lines(1, 2, 3)", "at most 2 arguments"),
        ("remove_lines(1, line_start=2)", "two values"),
        ("remove_lines(line_start=1, line_start=2)", "keyword 'line_start' repeated"),
        ("remove_lines(line_start=1, line_end=2, color=3)", "unexpected keyword 'color'"),
        ("remove_lines(line_start=x, line_end=2)", "arguments must be literals"),
        ("remove_lines(line_start=1, line_end=2", "not a function call"),
        ("remove_lines(**{'line_start': 1})", "**kwargs"),
        ('normalize(source_str="", target_str="x")', "source_str '' is ignored"),
        ('normalize(source_str=" ", target_str="x")', "source_str ' ' is ignored"),
        ('normalize(source_str=1, target_str="x")', "needs string"),
        ("normalize()", "needs string"),
        ('normalize(source_str="a)', "not a function call"),
        ("keep_chunk(1)", "takes no arguments"),
        ("drop_doc()", "unknown chunk-level function 'drop_doc'"),
        ("rm -rf /", "not a function call"),
        ("os.system('x')", "not a function call"),
        ("__import__('os')", "unknown chunk-level function '__import__'"),
        ("remove_lines(line_start=__import__('os'), line_end=2)", "arguments must be literals"),
        ("remove_lines(line_start=1, line_end=2); keep_chunk()", "not a function call"),
        ("```python", "not a function call"),
    ],
)
def test_bad_chunk_lines_are_one_error(line, reason):
    operations, errors = ops(line)
    assert operations == []
    assert len(errors) == 1 and errors[0].line == 1
    assert reason in errors[0].reason


def test_doc_stage_rejects_chunk_functions():
    operations, errors = ops("keep_chunk()\nremove_lines(1, 2)\ndrop_doc(1)", "doc")
    assert operations == []
    assert [e.line for e in errors] == [1, 2, 3]
    assert "unknown doc-level function 'keep_chunk'" in errors[0].reason
    assert "takes no arguments" in errors[2].reason


def test_lines_blank_lines_and_error_line_numbers():
    program = parse_program(
        "\nremove_lines(line_start=0, line_end=1)\n\n  \nbogus\nnormalize('a', 'b')\nfoo()\n",
        "chunk",
    )
    assert program.operations == [(2, RemoveLines(0, 1)), (6, Normalize("a", "b"))]
    assert program.errors == [
        ProgramError(5, "not a function call"),
        ProgramError(7, "unknown chunk-level function 'foo'"),
    ]


def test_leading_zero_numbers_are_rejected_like_python():
    # '007' is not a Python integer literal; the fast path must agree with ast.
    _, errors = ops("remove_lines(line_start=007, line_end=8)")
    assert len(errors) == 1


def test_unicode_digits_are_not_numbers():
    _, errors = ops("remove_lines(line_start=\u0661, line_end=8)")
    assert len(errors) == 1


def test_eval_is_never_used(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("eval called")

    monkeypatch.setattr(builtins, "eval", boom)
    assert ops("normalize(source_str='(1+1)', target_str='2')") == ([Normalize("(1+1)", "2")], [])
    _, errors = ops("normalize(source_str=(1+1), target_str='2')")
    assert len(errors) == 1


def test_bad_stage():
    with pytest.raises(ValueError, match="stage"):
        parse_program("keep_chunk()", "line")


_plain = st.text(
    alphabet=st.characters(blacklist_characters='"\\', blacklist_categories=("Cc", "Cs")),
    max_size=15,
)


@settings(max_examples=300, deadline=None)
@given(source=_plain, target=_plain, a=st.integers(0, 10**6), b=st.integers(0, 10**6))
def test_fast_paths_agree_with_ast(source, target, a, b):
    # canonical spellings take a regex fast path; an extra space sends them through ast
    for fast, slow in (
        (f'normalize(source_str="{source}", target_str="{target}")',
         f'normalize(source_str = "{source}", target_str="{target}")'),
        (f"remove_lines(line_start={a}, line_end={b})",
         f"remove_lines(line_start = {a}, line_end={b})"),
    ):  # fmt: skip
        fast_program, slow_program = parse_program(fast, "chunk"), parse_program(slow, "chunk")
        assert fast_program.operations == slow_program.operations
        assert [e.reason for e in fast_program.errors] == [e.reason for e in slow_program.errors]


def test_invalid_escapes_are_literal_even_with_warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops(r'normalize(source_str="\d+", target_str="N")') == ([Normalize("\\d+", "N")], [])
