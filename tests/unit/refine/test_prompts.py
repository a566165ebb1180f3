"""Prompt rendering and document-level truncation, with a stand-in tokenizer (one token per
character, a fixed chat format) so the expected prompts are computed by hand."""

import pytest

from megatron_slm.refine.prompts import (
    SYSTEM_PROMPT,
    PromptError,
    chunk_prompt,
    count_prompt_tokens,
    doc_prompt,
)


class CharTokenizer:
    is_fast = True

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + "<assistant>"

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        assert not add_special_tokens
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def expected(user):
    return f"<system>{SYSTEM_PROMPT}</system><user>{user}</user><assistant>"


TOK = CharTokenizer()
OVERHEAD = len(expected(""))


def test_short_document_is_sent_whole():
    assert doc_prompt(TOK, "hello\nworld", max_tokens=OVERHEAD + 11) == (
        expected("hello\nworld"),
        False,
    )


def test_long_document_is_cut_never_the_template():
    document = "abcdefghij" * 10
    prompt, truncated = doc_prompt(TOK, document, max_tokens=OVERHEAD + 25)
    assert truncated and prompt == expected(document[:25])
    assert count_prompt_tokens(TOK, prompt) == OVERHEAD + 25


def test_template_too_long_is_an_error():
    with pytest.raises(PromptError, match="chat template alone takes"):
        doc_prompt(TOK, "x" * 100, max_tokens=OVERHEAD)


def test_chunk_prompt():
    assert chunk_prompt(TOK, "[doc]\n[000]a\n[/doc]") == expected("[doc]\n[000]a\n[/doc]")


class MergingTokenizer(CharTokenizer):
    """'ab' is one token: the document's tokens do not add up inside the template, and the
    truncation loop must shrink until the rendered prompt fits."""

    is_fast = False

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids, i = [], 0
        while i < len(text):
            ids.append(0 if text.startswith("ab", i) else ord(text[i]))
            i += 2 if text.startswith("ab", i) else 1
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("ab" if t == 0 else chr(t) for t in ids)


def test_truncation_loop_with_a_slow_tokenizer():
    tok = MergingTokenizer()
    overhead = count_prompt_tokens(tok, expected(""))
    document = "ab" * 10 + "xyz" * 10
    prompt, truncated = doc_prompt(tok, document, max_tokens=overhead + 15)
    assert truncated
    assert prompt.startswith(expected("")[: -len("</user><assistant>")])
    assert prompt.endswith("</user><assistant>")
    assert count_prompt_tokens(tok, prompt) <= overhead + 15
    assert prompt == expected("ab" * 10 + "xyzxy")  # 10 + 5 tokens
