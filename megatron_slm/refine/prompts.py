"""Chat prompts for the ProX refining models, rendered with the model's own chat template (or, for
the document level with ``--doc-template llama2``, Llama-2-chat's, as ProX's released code does).

Both stages send two messages (ProX's): the system message :data:`SYSTEM_PROMPT` and a user message
with the text, then the template's generation prompt:

* document level: the user message is the raw document, truncated at the end so the whole rendered
  prompt is <= ``max_tokens`` tokens. Only the document is cut, never the template (ProX truncates
  the rendered prompt from the right, which loses the end-of-instruction marker);
* chunk level: the user message is one chunk, ``[doc]\\n[000]first line\\n...\\n[/doc]``.

``--semantics prox`` builds the prompts as ProX's released code did, as token ids
(:func:`prox_doc_prompt_ids`, :func:`prox_chunk_prompt_ids`).

``tokenizer`` is a Hugging Face tokenizer (duck-typed: ``apply_chat_template``, ``__call__``,
``decode``); this module does not import transformers.

The seed examples of ``tools/prox_annotate.py`` are built from the same functions
(:func:`chat_messages`, :func:`doc_message`), so a refining model fine-tuned on them sees at
training time exactly the messages ``tools/prox_refine.py`` sends at inference.
"""

from __future__ import annotations

from megatron_slm.errors import UserError

SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."
DOC_TEMPLATES = ("model", "llama2")


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


def llama2_chat_prompt(tokenizer, user_message: str) -> str:
    """Llama-2-chat's chat template on (system, user): ProX renders the document prompt with it
    (``--token_template meta-llama/Llama-2-7b-chat-hf``, its BOS replaced by the refining
    model's). The template strips the system block + message as one string, and writes nothing
    for the generation prompt."""
    content = f"<<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n{user_message}".strip()
    return f"{tokenizer.bos_token or ''}[INST] {content} [/INST]"


def chat_prompt(tokenizer, user_message: str, template: str = "model") -> str:
    if template == "llama2":
        return llama2_chat_prompt(tokenizer, user_message)
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


def doc_prompt(
    tokenizer, document: str, max_tokens: int = 2000, template: str = "model"
) -> tuple[str, bool]:
    """``(prompt, truncated)`` for the document-level model."""
    message, truncated = doc_message(tokenizer, document, max_tokens, template)
    return chat_prompt(tokenizer, message, template), truncated


def doc_message(
    tokenizer, document: str, max_tokens: int = 2000, template: str = "model"
) -> tuple[str, bool]:
    """``(user message, truncated)``: the document, cut so the rendered prompt fits."""
    prompt = chat_prompt(tokenizer, document, template)
    length = count_prompt_tokens(tokenizer, prompt)
    if length <= max_tokens:
        return document, False
    overhead = count_prompt_tokens(tokenizer, chat_prompt(tokenizer, "", template))
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
        excess = (
            count_prompt_tokens(tokenizer, chat_prompt(tokenizer, message, template)) - max_tokens
        )
        if excess <= 0:
            return message, True
        budget -= max(1, excess)


def chunk_prompt(tokenizer, wrapped_chunk: str) -> str:
    """The chunk-level prompt for an already wrapped chunk (see ``chunking.wrap_chunk``)."""
    return chat_prompt(tokenizer, wrapped_chunk)


def prox_doc_prompt_ids(
    tokenizer, document: str, max_tokens: int = 2000, template: str = "model"
) -> tuple[list[int], bool]:
    """``(token ids, truncated)`` as ProX's document stage builds them: the rendered prompt
    tokenized without added special tokens (``apply_chat_template(tokenize=True)``), then cut to
    ``max_tokens`` ids from the right, so a long document loses the template's end too."""
    rendered = chat_prompt(tokenizer, document, template)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return ids[:max_tokens], len(ids) > max_tokens


def prox_chunk_prompt_ids(tokenizer, wrapped_chunk: str) -> list[int]:
    """The chunk prompt's ids as ProX sent them: the rendered text handed to vLLM's
    ``LLM.generate``, which tokenizes with the tokenizer's special tokens added (a tokenizer that
    prepends BOS gives a second one after a template's own)."""
    return tokenizer(chunk_prompt(tokenizer, wrapped_chunk))["input_ids"]


def prox_count_line_tokens(tokenizer, lines: list[str]) -> list[int]:
    """ProX's chunk packing counts each numbered line with ``tokenizer.encode``: special tokens
    (BOS) included, once per line."""
    return [len(ids) for ids in tokenizer(lines)["input_ids"]]
