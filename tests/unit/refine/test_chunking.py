"""Chunk packing in ProX's numbered-line format, with a character-count tokenizer stand-in."""

from megatron_slm.refine.chunking import number_line, split_into_chunks, wrap_chunk


def char_counts(lines):
    return [len(line) for line in lines]


def test_number_line_format():
    assert number_line(0, "abc") == "[000]abc"
    assert number_line(42, "") == "[042]"
    assert number_line(1234, "x") == "[1234]x"  # more digits when needed
    assert number_line(7, "x", "[{i:03d}] ") == "[007] x"


def test_wrap_chunk():
    assert wrap_chunk("[000]a\n[001]b") == "[doc]\n[000]a\n[001]b\n[/doc]"


def test_greedy_packing_and_document_wide_numbers():
    text = "\n".join(["aaaa"] * 7)  # each numbered line '[00i]aaaa' is 9 characters
    chunks, long_lines = split_into_chunks(text, char_counts, max_tokens=20)
    assert long_lines == []
    assert [(c.first_line, c.last_line, c.tokens) for c in chunks] == [
        (0, 1, 18),
        (2, 3, 18),
        (4, 5, 18),
        (6, 6, 9),
    ]
    assert chunks[1].body == "[002]aaaa\n[003]aaaa"
    assert all(c.tokens <= 20 for c in chunks)


def test_exact_fit_stays_in_one_chunk():
    chunks, _ = split_into_chunks("aaaa\naaaa", char_counts, max_tokens=18)
    assert [(c.first_line, c.last_line) for c in chunks] == [(0, 1)]


def test_over_long_line_is_never_sent_and_kept_aside():
    text = "ab\n" + "x" * 50 + "\ncd\nef"
    chunks, long_lines = split_into_chunks(text, char_counts, max_tokens=20)
    assert long_lines == [1]
    assert [(c.first_line, c.last_line, c.body) for c in chunks] == [
        (0, 0, "[000]ab"),
        (2, 3, "[002]cd\n[003]ef"),
    ]
    assert all("x" * 21 not in c.body for c in chunks)


def test_only_long_lines():
    chunks, long_lines = split_into_chunks("x" * 30 + "\n" + "y" * 30, char_counts, 20)
    assert chunks == [] and long_lines == [0, 1]


def test_every_line_in_exactly_one_chunk_or_long():
    text = "\n".join("w" * (i * 7 % 23) for i in range(50))
    chunks, long_lines = split_into_chunks(text, char_counts, max_tokens=25)
    seen = sorted([i for c in chunks for i in range(c.first_line, c.last_line + 1)] + long_lines)
    assert seen == list(range(50))
    for c in chunks:
        expected = "\n".join(
            number_line(i, text.split("\n")[i]) for i in range(c.first_line, c.last_line + 1)
        )
        assert c.body == expected and c.tokens <= 25


def test_empty_document_is_one_empty_line():
    chunks, long_lines = split_into_chunks("", char_counts, max_tokens=20)
    assert [(c.first_line, c.last_line, c.body) for c in chunks] == [(0, 0, "[000]")]
