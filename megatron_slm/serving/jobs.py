"""Generation requests: what a client asks for (Megatron-LM's ``PUT /api``, OpenAI's
``POST /v1/completions`` or ``/v1/chat/completions`` body), checked and tokenized into a
:class:`Job` every rank runs alike, and the :class:`Completion` of each prompt formatted back into
that API's response.

A job holds token ids, never text: rank 0 tokenizes and checks it, so every rank of the model
receives the same job and no rank can fail where another succeeds.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from megatron_slm.errors import UserError
from megatron_slm.runtime.sampling import Sampling

MAX_PROMPTS = 128  # Megatron-LM's limit per request
MAX_TOP_LOGPROBS = 5  # OpenAI's
API_DEFAULT_TOKENS = 64  # Megatron-LM's ``tokens_to_generate`` default
OPENAI_DEFAULT_TOKENS = 16  # OpenAI's ``max_tokens`` default


class RequestError(UserError):
    """A request the server refuses (HTTP 400) with this message."""


@dataclass
class Job:
    """One request's work, identical on every rank."""

    prompts: list[list[int]]
    max_new_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion and are cut from its text (OpenAI's ``stop``)."""
    stop_kept: list[str] = field(default_factory=list)
    """Strings that end a completion and stay in its text (Megatron-LM's ``stop_on_eol``)."""
    logprobs: int | None = None
    """None: no log probabilities; 0: each token's; n > 0: also the n most likely per position."""


@dataclass
class Completion:
    """One prompt's outcome."""

    prompt: list[int]
    new: list[int]
    """The generated ids (an end-of-document id included, as ``transformers`` does)."""
    text: str
    """The generated text: end-of-document removed, cut before a ``stop`` string."""
    finish_reason: str
    """``stop`` (end of document or a stop string) or ``length``."""
    logprobs: list[float] | None = None
    """Log probability of each token after the first of ``prompt + new``."""
    top_logprobs: list[dict[int, float]] | None = None
    """The most likely ids and their log probabilities at each of those positions."""


# ---------------------------------------------------------------------------------------------
# reading a request
# ---------------------------------------------------------------------------------------------
def typed_field(body: dict, key: str, kinds, default, what: str):
    """``body[key]`` (``default`` when absent), refused unless one of ``kinds`` (``what`` says
    what it must be)."""
    value = body.get(key, default)
    if value is None and default is None:
        return None
    # bool is an int in Python; a flag that wants a number must not take true/false
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise RequestError(f"{key} must be {what}, got {value!r}")
    return value


def _seed(body: dict, key: str, default_seed: int | None) -> int:
    """The request's seed; none (or Megatron-LM's -1): the server's ``--seed``, else random."""
    seed = typed_field(body, key, (int,), None, "an integer")
    if seed is None or seed == -1:
        return default_seed if default_seed is not None else random.randrange(2**31)
    if seed < 0:
        raise RequestError(f"{key} must be >= 0 (or -1 for a random seed), got {seed}")
    return seed


def _stop_strings(value, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise RequestError(f"{key} must be a non-empty string or a list of them")
    if len(value) > 4:
        raise RequestError(f"{key}: at most 4 stop strings, got {len(value)}")
    return list(value)


class Tokenization:
    """Prompt text -> ids with the model's tokenizer, and the limits every prompt must fit."""

    def __init__(self, tokenizer, max_positions: int):
        if tokenizer is None:
            raise UserError("the model has no tokenizer: give --tokenizer-model")
        self.tokenizer = tokenizer
        self.max_positions = max_positions

    @property
    def bos(self) -> int | None:
        return getattr(self.tokenizer, "bos", None)

    def encode(self, text: str, add_bos: bool = False, specials: bool = True) -> list[int]:
        """``text``'s ids: ``tokenize``'s (a Llama2Tokenizer's BOS first), or with ``specials``
        false Hugging Face's ``add_special_tokens=False`` (special-token strings as their ids,
        nothing added); ``add_bos``: BOS (else EOD, as Megatron-LM's ``add_BOS``) leads."""
        tokenizer = self.tokenizer
        try:
            if specials:
                ids = tokenizer.tokenize(text)
            else:
                try:
                    ids = tokenizer.tokenize_with_specials(text)
                except NotImplementedError:  # no special tokens (the NullTokenizer)
                    ids = tokenizer.tokenize_plain(text)
        except ValueError as e:  # (UserError too: a NullTokenizer's text that is not ids)
            raise RequestError(f"cannot tokenize a prompt: {e}") from None
        ids = [int(i) for i in ids]
        first = self.bos if self.bos is not None else self.tokenizer.eod
        if add_bos and ids[:1] != [first]:
            ids = [first, *ids]
        return ids

    def check_ids(self, ids: list, what: str) -> None:
        """Every entry of ``ids`` an integer id of the vocabulary."""
        vocab = self.tokenizer.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"{what}: token ids must be integers in [0, {vocab})")

    def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        for i, ids in enumerate(prompts):
            if not ids:
                raise RequestError(f"prompt {i} is empty")
            if len(ids) >= self.max_positions:
                raise RequestError(
                    f"prompt {i} has {len(ids)} tokens; the model reads at most "
                    f"{self.max_positions} positions"
                )
            self.check_ids(ids, f"prompt {i}")
        if max_new_tokens < 0:
            raise RequestError("the number of tokens to generate must be >= 0")


def megatron_api_job(body: dict, tok: Tokenization, default_seed: int | None) -> Job:
    """Megatron-LM's ``PUT /api`` body -> a job (its fields, defaults and limits)."""
    if not isinstance(body, dict) or "prompts" not in body:
        raise RequestError("prompts argument required")
    for old, new in (("max_len", "tokens_to_generate"), ("sentences", "prompts")):
        if old in body:
            raise RequestError(f"{old} is no longer used; replace it with {new}")
    for unsupported in ("beam_width", "top_p_decay", "top_p_bound", "prevent_newline_after_colon"):
        if body.get(unsupported):
            raise RequestError(f"{unsupported} is not supported by this server")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts is not a list of strings")
    if not prompts:
        raise RequestError("prompts is empty")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"Maximum number of prompts is {MAX_PROMPTS}")
    tokens = typed_field(body, "tokens_to_generate", (int,), API_DEFAULT_TOKENS, "an integer >= 0")
    logprobs = typed_field(body, "logprobs", (bool,), False, "a boolean")
    if tokens == 0 and not logprobs:
        raise RequestError("tokens_to_generate=0 implies logprobs should be True")
    temperature = typed_field(body, "temperature", (int, float), 1.0, "a number in (0, 100]")
    if not 0.0 < temperature <= 100.0:
        raise RequestError("temperature must be a positive number less than or equal to 100.0")
    top_k = typed_field(body, "top_k", (int,), 0, "an integer in [0, 1000]")
    if not 0 <= top_k <= 1000:
        raise RequestError(
            "top_k must be equal to or greater than 0 and less than or equal to 1000"
        )
    top_p = typed_field(body, "top_p", (int, float), 0.0, "a number in [0, 1]")
    if not 0.0 <= top_p <= 1.0:
        raise RequestError("top_p must be less than or equal to 1.0")
    if top_p > 0.0 and top_k > 0:
        raise RequestError("cannot set both top-k and top-p samplings.")
    add_bos = typed_field(body, "add_BOS", (bool,), False, "a boolean")
    kept = []
    if typed_field(body, "stop_on_double_eol", (bool,), False, "a boolean"):
        kept.append("\n\n")
    if typed_field(body, "stop_on_eol", (bool,), False, "a boolean"):
        kept.append("\n")
    ids = [tok.encode(p, add_bos) for p in prompts]
    tok.check(ids, tokens)
    sampling = Sampling(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p if top_p > 0.0 else 1.0,  # Megatron-LM's 0: no nucleus filter
        seed=_seed(body, "random_seed", default_seed),
    )
    return Job(ids, tokens, sampling, stop_kept=kept, logprobs=0 if logprobs else None)


def _openai_prompts(prompt, tok: Tokenization) -> tuple[list[list[int]], list[str] | None]:
    """OpenAI's ``prompt``: a string, a list of strings, a list of ids or a list of id lists ->
    (ids per prompt, the texts when given as text)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("prompt must be a string, a list of strings or a list of token ids")
    if all(isinstance(p, str) for p in prompt):
        return [tok.encode(p) for p in prompt], list(prompt)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [list(prompt)], None
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt], None
    raise RequestError("prompt must be a string, a list of strings or a list of token ids")


def openai_completions_job(body: dict, tok: Tokenization, default_seed: int | None):
    """OpenAI's ``POST /v1/completions`` body -> (job, echo, prompt texts or None)."""
    if not isinstance(body, dict) or "prompt" not in body:
        raise RequestError("prompt is required")
    ids, texts = _openai_prompts(body["prompt"], tok)
    if len(ids) > MAX_PROMPTS:
        raise RequestError(f"at most {MAX_PROMPTS} prompts per request")
    tokens = typed_field(body, "max_tokens", (int,), OPENAI_DEFAULT_TOKENS, "an integer >= 0")
    echo = typed_field(body, "echo", (bool,), False, "a boolean")
    if tokens == 0 and not echo:
        raise RequestError("max_tokens=0 needs echo=true (nothing would be returned)")
    logprobs = typed_field(body, "logprobs", (int,), None, f"an integer in [0, {MAX_TOP_LOGPROBS}]")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    tok.check(ids, tokens)
    stop = _stop_strings(body.get("stop"), "stop")
    sampling = _openai_sampling(body, default_seed)
    return Job(ids, tokens, sampling, stop=stop, logprobs=logprobs), echo, texts


def _openai_sampling(body: dict, default_seed: int | None) -> Sampling:
    """OpenAI's ``temperature`` (0: greedy), ``top_p``, ``seed``, and ``top_k`` (vLLM's
    extension); one completion per prompt, not streamed (``n``, ``best_of``, ``stream``)."""
    for key, limit in (("n", 1), ("best_of", 1)):
        if typed_field(body, key, (int,), 1, "an integer") != limit:
            raise RequestError(f"{key} > 1 is not supported by this server")
    if body.get("stream"):
        raise RequestError("stream is not supported by this server")
    temperature = typed_field(body, "temperature", (int, float), 1.0, "a number in [0, 2]")
    if not 0.0 <= temperature <= 2.0:
        raise RequestError(f"temperature must be in [0, 2], got {temperature}")
    top_p = typed_field(body, "top_p", (int, float), 1.0, "a number in (0, 1]")
    if not 0.0 < top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    top_k = typed_field(body, "top_k", (int,), 0, "an integer >= 0")
    if top_k < 0:
        raise RequestError(f"top_k must be >= 0, got {top_k}")
    return Sampling(temperature, top_k, top_p, _seed(body, "seed", default_seed))


def openai_chat_job(body: dict, tok: Tokenization, default_seed: int | None) -> Job:
    """OpenAI's ``POST /v1/chat/completions`` body -> a job: the messages rendered with the
    tokenizer's chat template (the one SFT trained with), the assistant's turn opened."""
    from megatron_slm.data.chat import ChatTemplateError

    if not isinstance(body, dict) or "messages" not in body:
        raise RequestError("messages is required")
    messages = body["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise RequestError("messages must be a non-empty list of {role, content} strings")
    if body.get("logprobs"):
        raise RequestError("logprobs is not supported on chat completions by this server")
    sampling = _openai_sampling(body, default_seed)
    try:
        ids = list(tok.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except (ChatTemplateError, NotImplementedError) as e:
        raise RequestError(f"cannot render the messages: {e}") from None
    tok.check([ids], 0)  # (a conversation too long is named before the token budget)
    room = tok.max_positions - len(ids)  # default: up to the model's last position
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    tokens = typed_field(body, key, (int,), room, "an integer >= 1")
    if tokens < 1:
        raise RequestError(f"{key} must be >= 1, got {tokens}")
    return Job([ids], tokens, sampling, stop=_stop_strings(body.get("stop"), "stop"))


# ---------------------------------------------------------------------------------------------
# writing a response
# ---------------------------------------------------------------------------------------------
def _piece(tokenizer, token: int) -> str:
    return tokenizer.detokenize([token])


def megatron_api_response(job: Job, done: list[Completion], prompts: list[str], tokenizer):
    """Megatron-LM's response: prompt + generation per prompt, each token's text, and (when
    asked) the log probability of every token after the first."""
    out = {
        "text": [p + c.text for p, c in zip(prompts, done)],
        "segments": [[_piece(tokenizer, t) for t in c.prompt + c.new] for c in done],
        "tokens": [c.prompt + c.new for c in done],
    }
    if job.logprobs is not None:
        out["logprobs"] = [c.logprobs for c in done]
    return out


def openai_completions_response(
    job: Job, done: list[Completion], echo: bool, texts: list[str] | None, tokenizer, model: str
) -> dict:
    """OpenAI's ``text_completion`` object (``logprobs`` without ``text_offset``)."""
    choices = []
    for i, c in enumerate(done):
        text = c.text
        if echo:
            text = (texts[i] if texts is not None else tokenizer.detokenize(c.prompt)) + text
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": c.finish_reason}
        if job.logprobs is not None:
            ids = c.prompt + c.new if echo else c.new
            first = 0 if echo else len(c.prompt) - 1  # offset into the logprobs of ids[1:]
            lps = [None] + c.logprobs if echo else c.logprobs[first:]
            tops = None
            if job.logprobs > 0:
                top = [None] + c.top_logprobs if echo else c.top_logprobs[first:]
                tops = [
                    None if t is None else {_piece(tokenizer, k): v for k, v in t.items()}
                    for t in top
                ]
            choice["logprobs"] = {
                "tokens": [_piece(tokenizer, t) for t in ids],
                "token_logprobs": lps,
                "top_logprobs": tops,
            }
        choices.append(choice)
    prompt_tokens = sum(len(c.prompt) for c in done)
    completion_tokens = sum(len(c.new) for c in done)
    return {
        "id": f"cmpl-{random.getrandbits(64):016x}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def openai_chat_response(done: list[Completion], model: str) -> dict:
    """OpenAI's ``chat.completion`` object (one choice)."""
    (c,) = done
    return {
        "id": f"chatcmpl-{random.getrandbits(64):016x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": len(c.prompt),
            "completion_tokens": len(c.new),
            "total_tokens": len(c.prompt) + len(c.new),
        },
    }
