"""The ProX executor: normalization, document-wide line removal, and the acceptance rule."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_slm.refine.executor import (
    DROP_DOC,
    DROP_EMPTY,
    DROP_RATIO,
    DROP_SHORT,
    KEEP_DOC,
    KEEP_ORIGINAL,
    KEEP_REFINED,
    SEMANTICS,
    AcceptanceRule,
    apply_chunk_program,
    execute_chunk_program,
    execute_doc_program,
)

# 12 lines of 3 words each: 36 words, so acceptance never interferes with the edit tests.
DOC = "\n".join(f"line{i} word{i} text{i}" for i in range(12))
LINES = DOC.split("\n")


def without(*indices):
    return "\n".join(line for i, line in enumerate(LINES) if i not in indices)


# the tests that apply to both semantics (well-formed programs) run in both
BOTH = pytest.mark.parametrize("semantics", SEMANTICS)


def refine(program, text=DOC, semantics="strict"):
    refined, errors, removed, normalizations = apply_chunk_program(text, program, semantics)
    return refined, [e.reason for e in errors], removed, normalizations


@BOTH
def test_remove_lines_inclusive_zero_based(semantics):
    assert refine("remove_lines(line_start=0, line_end=0)", semantics=semantics) == (
        without(0),
        [],
        1,
        0,
    )
    assert refine("remove_lines(line_start=2, line_end=4)", semantics=semantics) == (
        without(2, 3, 4),
        [],
        3,
        0,
    )
    assert refine("remove_lines(line_start=11, line_end=11)", semantics=semantics) == (
        without(11),
        [],
        1,
        0,
    )


def test_positional_and_keyword_forms_agree():
    expected = without(5, 6)
    for program in (
        "remove_lines(line_start=5, line_end=6)",
        "remove_lines(start=5, end=6)",
        "remove_lines(5, 6)",
        "remove_lines(5, line_end=6)",
    ):
        assert refine(program)[0] == expected, program


@BOTH
def test_overlapping_and_adjacent_ranges_merge(semantics):
    program = "\n".join(
        [
            "remove_lines(line_start=2, line_end=5)",
            "remove_lines(line_start=4, line_end=6)",  # overlaps
            "remove_lines(line_start=7, line_end=7)",  # adjacent
            "remove_lines(line_start=3, line_end=3)",  # inside
            "remove_lines(line_start=10, line_end=10)",
        ]
    )
    assert refine(program, semantics=semantics) == (without(2, 3, 4, 5, 6, 7, 10), [], 7, 0)


@BOTH
def test_numbering_is_document_wide_across_chunks(semantics):
    # Two chunk programs joined (chunk 1 showed lines 0..5, chunk 2 lines 6..11): chunk 2's
    # numbers are the document's, not restarted at 0.
    chunk_1 = "remove_lines(line_start=1, line_end=1)"
    chunk_2 = "remove_lines(line_start=8, line_end=9)"
    assert refine(chunk_1 + "\n" + chunk_2, semantics=semantics) == (without(1, 8, 9), [], 3, 0)


def test_out_of_range_start_is_an_error_and_removes_nothing():
    refined, errors, removed, _ = refine("remove_lines(line_start=12, line_end=14)")
    assert (refined, removed) == (DOC, 0)
    assert errors == ["range 12..14 outside the document (0..11)"]


def test_out_of_range_end_is_an_error_and_clamped():
    refined, errors, removed, _ = refine("remove_lines(line_start=10, line_end=99)")
    assert (refined, removed) == (without(10, 11), 2)
    assert errors == ["range end 99 past the last line 11"]


def test_reversed_range_is_an_error_and_removes_nothing():
    refined, errors, removed, _ = refine("remove_lines(line_start=5, line_end=2)")
    assert (refined, removed) == (DOC, 0)
    assert errors == ["reversed range 5..2"]


@BOTH
def test_remove_all(semantics):
    assert refine("remove_lines(all=True)", semantics=semantics) == ("", [], 12, 0)


@BOTH
def test_normalize_replaces_everywhere_before_removal(semantics):
    text = "a ad x\nkeep ad\nad line\nlast"
    program = (
        "remove_lines(line_start=2, line_end=2)\n"  # listed first, still runs after normalize
        'normalize(source_str="ad", target_str="AD")'
    )
    assert refine(program, text, semantics) == ("a AD x\nkeep AD\nlast", [], 1, 1)


def test_normalize_runs_in_order_and_can_delete():
    text = "one two three"
    program = 'normalize("one", "two")\nnormalize(source_str="two ")'
    assert refine(program, text) == ("three", [], 0, 2)


def test_line_numbers_count_on_the_normalized_document():
    # ProX splits lines after normalizing: a normalization that joins lines shifts numbers.
    text = "l0\nl1\nl2\nl3"
    program = 'normalize(source_str="l0\\nl1", target_str="l01")\nremove_lines(1, 1)'
    assert refine(program, text) == ("l01\nl3", [], 1, 1)


def test_empty_or_space_source_is_ignored_and_counted():
    refined, errors, _, normalizations = refine(
        'normalize(source_str="", target_str="x")\nnormalize(source_str=" ", target_str="")'
    )
    assert (refined, normalizations) == (DOC, 0)
    assert len(errors) == 2


def test_strings_with_commas_quotes_parentheses():
    text = 'f(a, b) = "c"\nsecond line'
    program = 'normalize(source_str="f(a, b) = \\"c\\"", target_str="g(x=1), \'y\'")'
    assert refine(program, text)[0] == "g(x=1), 'y'\nsecond line"


@BOTH
def test_keep_chunk_only_returns_document_unchanged(semantics):
    assert refine("keep_chunk()\nkeep_chunk()", semantics=semantics) == (DOC, [], 0, 0)


# ---------------------------------------------------------------------------------------------
# acceptance
# ---------------------------------------------------------------------------------------------
def words_doc(n_words, per_line=1):
    words = [f"w{i}" for i in range(n_words)]
    return "\n".join(" ".join(words[i : i + per_line]) for i in range(0, n_words, per_line))


@BOTH
def test_ratio_at_threshold_drops(semantics):
    text = words_doc(40)  # 40 lines of one word
    # keep 2 of 40 words: ratio 0.05 <= 0.05 -> drop
    result = execute_chunk_program(
        text, "remove_lines(line_start=2, line_end=39)", semantics=semantics
    )
    assert result.decision == DROP_RATIO and result.dropped
    assert result.text == text and result.words_before == 40 and result.words_after == 0


@BOTH
def test_ratio_above_threshold_then_short_rule(semantics):
    text = words_doc(40)
    # keep 3 of 40: ratio 0.075 > 0.05, but 3 <= 10 words -> dropped as short
    result = execute_chunk_program(
        text, "remove_lines(line_start=3, line_end=39)", semantics=semantics
    )
    assert result.decision == DROP_SHORT


@BOTH
def test_short_rule_boundary(semantics):
    text = words_doc(40)
    at = execute_chunk_program(
        text, "remove_lines(line_start=10, line_end=39)", semantics=semantics
    )  # 10 words
    above = execute_chunk_program(
        text, "remove_lines(line_start=11, line_end=39)", semantics=semantics
    )  # 11 words
    assert at.decision == DROP_SHORT
    assert above.decision == KEEP_REFINED
    assert above.text == words_doc(11) and above.lines_removed == 29
    assert (above.words_before, above.words_after) == (40, 11)


@BOTH
def test_short_documents_are_dropped_even_untouched(semantics):
    # ProX's FineWeb rule: <= 10 words after refining drops, whatever the program.
    assert (
        execute_chunk_program(words_doc(10), "keep_chunk()", semantics=semantics).decision
        == DROP_SHORT
    )
    assert (
        execute_chunk_program(words_doc(11), "keep_chunk()", semantics=semantics).decision
        == KEEP_REFINED
    )


def test_errors_below_limit_keep_refined():
    result = execute_chunk_program(DOC, "remove_lines(0, 0)\nbogus")
    assert result.decision == KEEP_REFINED and result.text == without(0)
    assert [e.line for e in result.errors] == [2]


def test_two_errors_keep_the_original():
    result = execute_chunk_program(DOC, "remove_lines(0, 0)\nbogus\nremove_lines(99, 100)")
    assert result.decision == KEEP_ORIGINAL and not result.dropped
    assert result.text == DOC and result.lines_removed == 0 and result.normalizations == 0
    assert [e.line for e in result.errors] == [2, 3]
    assert result.words_after == result.words_before == 36


def test_two_errors_do_not_drop_by_ratio_but_short_still_drops():
    text = words_doc(40)
    # remove everything, with two errors: the ratio rule needs errors < 2 ...
    result = execute_chunk_program(text, "remove_lines(0, 39)\nx\ny")
    # ... but the short rule does not look at errors (ProX's order).
    assert result.decision == DROP_SHORT


def test_custom_thresholds():
    text = words_doc(40)
    rule = AcceptanceRule(drop_ratio=0.5, drop_words=0, max_errors=1)
    # 20/40 = 0.5 <= 0.5 -> drop
    assert execute_chunk_program(text, "remove_lines(20, 39)", rule).decision == DROP_RATIO
    # 21/40 > 0.5 -> refined
    assert execute_chunk_program(text, "remove_lines(21, 39)", rule).decision == KEEP_REFINED
    # one error with max_errors=1 -> original
    assert execute_chunk_program(text, "remove_lines(21, 39)\nx", rule).decision == KEEP_ORIGINAL


@BOTH
@pytest.mark.parametrize("text", ["", " ", "\n\n", " \t\n "])
def test_empty_documents_are_dropped(text, semantics):
    result = execute_chunk_program(text, "keep_chunk()", semantics=semantics)
    assert result.decision == DROP_EMPTY and result.dropped


def test_doc_programs():
    assert execute_doc_program("drop_doc()").decision == DROP_DOC
    assert execute_doc_program("keep_doc()").decision == KEEP_DOC
    assert execute_doc_program("untouch_doc()").decision == KEEP_DOC
    assert execute_doc_program("").decision == KEEP_DOC
    bad = execute_doc_program("keep_doc()\nnonsense here")
    assert bad.decision == KEEP_DOC and [e.line for e in bad.errors] == [2]
    assert execute_doc_program("keep_doc()\ndrop_doc()").decision == DROP_DOC


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
_calls = st.sampled_from(
    [
        "remove_lines(line_start={a}, line_end={b})",
        "remove_lines({a}, {b})",
        "remove_lines(start={a}, end={b})",
        'normalize(source_str="{s}", target_str="{t}")',
        "normalize({s!r}, {t!r})",
        "keep_chunk()",
        "drop_doc()",
        "remove_lines(all=True)",
        "{s}",
    ]
)


@st.composite
def programs(draw):
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        template = draw(_calls)
        lines.append(
            template.format(
                a=draw(st.integers(-3, 40)),
                b=draw(st.integers(-3, 40)),
                s=draw(st.text(max_size=12)),
                t=draw(st.text(max_size=12)),
            )
        )
    if draw(st.booleans()):
        lines.append(draw(st.text(max_size=60)))
    return "\n".join(lines)


@BOTH
@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300), program=st.one_of(st.text(max_size=200), programs()))
def test_executor_never_raises(text, program, semantics):
    result = execute_chunk_program(text, program, semantics=semantics)
    assert result.decision in {DROP_EMPTY, DROP_RATIO, DROP_SHORT, KEEP_REFINED, KEEP_ORIGINAL}
    assert result.words_before == len(text.split())
    if result.dropped:
        assert result.words_after == 0
    else:  # derived without re-splitting when possible: must equal a plain count
        assert result.words_after == len(result.text.split())
    execute_doc_program(program, semantics)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=400),
    program=st.lists(st.sampled_from(["keep_chunk()", "", "  keep_chunk()  "]), max_size=5),
)
def test_keep_chunk_only_is_identity(text, program):
    program = "\n".join(["keep_chunk()"] + program)
    for semantics in SEMANTICS:
        refined, errors, removed, normalizations = apply_chunk_program(text, program, semantics)
        assert (refined, errors, removed, normalizations) == (text, [], 0, 0)
    result = execute_chunk_program(text, program)
    assert result.text == text


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=8),
        min_size=1,
        max_size=30,
    ),
    ranges=st.lists(st.tuples(st.integers(0, 35), st.integers(0, 35)), max_size=5),
)
def test_removal_matches_a_set_reference(lines, ranges):
    # independent reference: a set of removed indices, valid ranges only
    text = "\n".join(lines)
    program = "\n".join(f"remove_lines({a}, {b})" for a, b in ranges)
    removed = set()
    for a, b in ranges:
        if a <= b and a < len(lines):
            removed.update(range(a, min(b, len(lines) - 1) + 1))
    expected = "\n".join(line for i, line in enumerate(lines) if i not in removed)
    refined, errors, n_removed, _ = apply_chunk_program(text, program)
    assert refined == expected and n_removed == len(removed)
    n_bad = sum(1 for a, b in ranges if a > b or a >= len(lines) or b >= len(lines))
    assert len(errors) == n_bad
