"""Chat templates: rendering (jinja2, as transformers renders them) and tokenization with an
assistant-token mask for supervised fine-tuning.

One template text serves training and inference: the trainer renders SFT examples with it, and
``tools/convert_checkpoint.py megatron-to-hf`` writes the same text into the exported
``tokenizer_config.json`` (``chat_template``), so prompts are formatted identically on both sides.

:data:`DEFAULT_CHAT_TEMPLATE` is plain text around the tokenizer's own ``bos``/``eos`` tokens, so it
works with any vocabulary (a small SentencePiece model has no ``<|im_start|>``-like pieces)::

    <s><|system|>\\nSYSTEM\\n<|user|>\\nUSER\\n<|assistant|>\\nANSWER</s>

Each assistant turn ends with ``eos`` (trained on: the model learns to stop); a generation prompt
ends with ``<|assistant|>\\n``.

SFT tokenization (:func:`tokenize_chat`) cuts the rendered text at each assistant turn's
boundaries (found by rendering message prefixes, so the template must be prefix-stable) and
tokenizes the pieces separately: a prompt piece gives exactly the ids the exported tokenizer gives
for the rendered generation prompt (``tokenizer(prompt, add_special_tokens=False)``), which is what
inference feeds the model.
"""

from __future__ import annotations

from functools import lru_cache

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    pass


@lru_cache(maxsize=8)
def _compile(template: str):
    """Compiled like transformers' ``_compile_jinja_template``: sandboxed, trim_blocks and
    lstrip_blocks, ``raise_exception`` and a ``tojson`` filter."""
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict],
    special_tokens: dict[str, str | None],
    add_generation_prompt: bool = False,
) -> str:
    """The rendered conversation (``special_tokens``: ``bos_token``, ``eos_token``, ...)."""
    import jinja2

    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template: {exc}") from None


def assistant_spans(
    template: str, messages: list[dict], special_tokens: dict[str, str | None]
) -> tuple[str, list[tuple[int, int]]]:
    """``(rendered, [(start, end), ...])``: character spans of each assistant turn (its content
    and what the template writes after it up to the next message, e.g. ``eos``)."""
    text = render_chat(template, messages, special_tokens)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(render_chat(template, messages[:i], special_tokens, True))
        end = len(render_chat(template, messages[: i + 1], special_tokens))
        prompt = render_chat(template, messages[:i], special_tokens, True)
        if not text.startswith(prompt) or end < start or (spans and start < spans[-1][1]):
            raise ChatTemplateError(
                "chat template is not prefix-stable (rendering the first messages is not a prefix "
                "of rendering them all): assistant turns cannot be located for the loss mask"
            )
        spans.append((start, end))
    return text, spans


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(ids, assistant_mask)`` of one conversation rendered with ``tokenizer.chat_template``.

    ``tokenizer`` has ``chat_template``, ``chat_special_tokens()`` and
    ``tokenize_with_specials(text)`` (special-token strings in the text become their ids, as a
    Hugging Face tokenizer does). Pieces between assistant-turn boundaries are tokenized
    separately; mask 1 on the assistant pieces' tokens.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatTemplateError(f"{type(tokenizer).__name__} has no chat template")
    text, spans = assistant_spans(template, messages, tokenizer.chat_special_tokens())
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for start, end in spans + [(len(text), len(text))]:
        for lo, hi, flag in ((pos, start, 0), (start, end, 1)):
            if hi > lo:
                piece = tokenizer.tokenize_with_specials(text[lo:hi])
                ids += piece
                mask += [flag] * len(piece)
        pos = end
    return ids, mask
