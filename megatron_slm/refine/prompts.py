"""Chat prompts for the ProX refining models, rendered with the model's own chat template.

Both stages send two messages (ProX's): the system message :data:`SYSTEM_PROMPT` and a user message
with the text, then the template's generation prompt:

* document level: the user message is the raw document, truncated at the end so the whole rendered
  prompt is <= ``max_tokens`` tokens. Only the document is cut, never the template (ProX truncates
  the rendered prompt from the right, which loses the end-of-instruction marker);
* chunk level: the user message is one chunk, ``[doc]\\n[000]first line\\n...\\n[/doc]``.

``tokenizer`` is a Hugging Face tokenizer (duck-typed: ``apply_chat_template``, ``__call__``,
``decode``); this module does not import transformers.

The seed examples of ``tools/prox_annotate.py`` are built from the same functions
(:func:`chat_messages`, :func:`doc_message`), so a refining model fine-tuned on them sees at
training time exactly the messages ``tools/prox_refine.py`` sends at inference.
"""

from __future__ import annotations

from megatron_slm.errors import UserError

SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."


class PromptError(UserError):
    pass


def chat_messages(user_message: str, answer: str | None = None) -> list[dict]:
    """The refining model's conversation; with ``answer`` (a program) it is an SFT example."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user_message},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def chat_prompt(tokenizer, user_message: str) -> str:
    return tokenizer.apply_chat_template(
        chat_messages(user_message), add_generation_prompt=True, tokenize=False
    )


def count_prompt_tokens(tokenizer, prompt: str) -> int:
    """Tokens of a rendered prompt (the template writes its own special tokens)."""
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _document_prefix(tokenizer, document: str, budget: int) -> str:
    """The longest prefix of ``document`` of about ``budget`` tokens, cut at a token boundary."""
    if budget <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= budget:
            return document
        return document[: offsets[budget - 1][1]]
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return document
    return tokenizer.decode(ids[:budget], skip_special_tokens=True)


def doc_prompt(tokenizer, document: str, max_tokens: int = 2000) -> tuple[str, bool]:
    """``(prompt, truncated)`` for the document-level model."""
    message, truncated = doc_message(tokenizer, document, max_tokens)
    return chat_prompt(tokenizer, message), truncated


def doc_message(tokenizer, document: str, max_tokens: int = 2000) -> tuple[str, bool]:
    """``(user message, truncated)``: the document, cut so the rendered prompt fits."""
    prompt = chat_prompt(tokenizer, document)
    length = count_prompt_tokens(tokenizer, prompt)
    if length <= max_tokens:
        return document, False
    overhead = count_prompt_tokens(tokenizer, chat_prompt(tokenizer, ""))
    if overhead >= max_tokens:
        raise PromptError(
            f"the chat template alone takes {overhead} tokens, more than --doc-max-prompt-tokens "
            f"{max_tokens}"
        )
    budget = max_tokens - overhead
    # Tokenization at the junction with the template can differ by a token or two: shrink until
    # the rendered prompt fits.
    while True:
        message = _document_prefix(tokenizer, document, budget)
        excess = count_prompt_tokens(tokenizer, chat_prompt(tokenizer, message)) - max_tokens
        if excess <= 0:
            return message, True
        budget -= max(1, excess)


def chunk_prompt(tokenizer, wrapped_chunk: str) -> str:
    """The chunk-level prompt for an already wrapped chunk (see ``chunking.wrap_chunk``)."""
    return chat_prompt(tokenizer, wrapped_chunk)
