"""The server's tokenizer endpoints, vLLM's protocol: ``GET /tokenizer_info``, ``POST /tokenize``
and ``POST /detokenize``. lm-evaluation-harness's API models use them as their tokenizer
(``tokenizer_backend=remote``, chosen automatically when the server answers them), so a served
checkpoint is evaluated with its own tokenizer and no Hugging Face tokenizer directory.

``add_special_tokens`` is Hugging Face's meaning: true, the ids ``tokenize`` gives (a
Llama2Tokenizer's BOS first); false (lm-eval's), the text alone, with special-token strings
(``</s>``, ``<|endoftext|>``) as their ids, as a rendered chat prompt is encoded.
"""

from __future__ import annotations

from megatron_slm.serving.jobs import RequestError, Tokenization, typed_field


def tokenizer_info(tok: Tokenization) -> dict:
    tokenizer = tok.tokenizer
    special = tokenizer.chat_special_tokens()
    eos = special.get("eos_token") or tokenizer.detokenize([tokenizer.eod])
    return {
        "eos_token": eos,
        "bos_token": special.get("bos_token"),
        "pad_token": special.get("pad_token"),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": tok.max_positions,
        "tokenizer_class": type(tokenizer).__name__,
    }


def tokenize(body, tok: Tokenization) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise RequestError("prompt must be a string")
    specials = typed_field(body, "add_special_tokens", (bool,), True, "a boolean")
    ids = tok.encode(body["prompt"], specials=specials)
    return {"tokens": ids, "count": len(ids), "max_model_len": tok.max_positions}


def detokenize(body, tok: Tokenization) -> dict:
    ids = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        raise RequestError("tokens must be a list of token ids")
    tok.check_ids(ids, "tokens")
    return {"prompt": tok.tokenizer.detokenize(ids)}
