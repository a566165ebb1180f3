"""Request bodies -> jobs (Megatron-LM's ``/api`` and OpenAI's ``/v1/completions``: defaults,
limits, one clear message per bad field) and completions -> responses (which log probabilities
sit where with and without ``echo``), with the synthetic NullTokenizer (text = ids)."""

from __future__ import annotations

import pytest

from megatron_slm.data.tokenizer import NullTokenizer
from megatron_slm.serving.jobs import (
    API_DEFAULT_TOKENS,
    MAX_PROMPTS,
    OPENAI_DEFAULT_TOKENS,
    Completion,
    RequestError,
    Tokenization,
    megatron_api_job,
    megatron_api_response,
    openai_completions_job,
    openai_completions_response,
)

TOK = NullTokenizer(49)  # ids 0 .. 48, then the EOD 49


@pytest.fixture
def tok():
    return Tokenization(TOK, max_positions=16)


def test_megatron_api_defaults_and_mapping(tok):
    job = megatron_api_job({"prompts": ["1 2 3", "4"]}, tok, default_seed=9)
    assert job.prompts == [[1, 2, 3], [4]] and job.max_new_tokens == API_DEFAULT_TOKENS
    s = job.sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (1.0, 0, 1.0, 9)  # top_p 0: no filter
    assert not s.is_greedy and job.logprobs is None and job.stop == job.stop_kept == []
    job = megatron_api_job(
        {"prompts": ["5"], "tokens_to_generate": 0, "logprobs": True, "top_k": 1,
         "add_BOS": True, "stop_on_eol": True, "stop_on_double_eol": True, "random_seed": 4},
        tok, None,
    )  # fmt: skip
    assert job.prompts == [[49, 5]]  # no BOS: EOD leads, as Megatron-LM's add_BOS does
    assert job.sampling.is_greedy and job.sampling.seed == 4 and job.logprobs == 0
    assert job.stop_kept == ["\n\n", "\n"] and job.stop == []
    seeds = {megatron_api_job({"prompts": ["1"]}, tok, None).sampling.seed for _ in range(5)}
    assert len(seeds) > 1  # no seed anywhere: a random one per request


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "prompts argument required"),
        ({"prompts": "1 2"}, "not a list of strings"),
        ({"prompts": []}, "prompts is empty"),
        ({"prompts": ["1"] * (MAX_PROMPTS + 1)}, "Maximum number of prompts"),
        ({"prompts": ["1"], "max_len": 3}, "tokens_to_generate"),
        ({"prompts": ["1"], "tokens_to_generate": 0}, "logprobs should be True"),
        ({"prompts": ["1"], "tokens_to_generate": True}, "tokens_to_generate must be"),
        ({"prompts": ["1"], "temperature": 0}, "temperature"),
        ({"prompts": ["1"], "top_k": 1001}, "top_k"),
        ({"prompts": ["1"], "top_k": 2, "top_p": 0.5}, "cannot set both"),
        ({"prompts": ["1"], "beam_width": 2}, "beam_width is not supported"),
        ({"prompts": ["1"], "random_seed": -5}, "random_seed must be >= 0"),
        ({"prompts": [""]}, "prompt 0 is empty"),
        ({"prompts": ["1", " ".join(["2"] * 16)]}, "prompt 1 has 16 tokens"),
        ({"prompts": ["1 x"]}, "cannot tokenize"),
        ({"prompts": ["60"]}, "cannot tokenize"),
    ],
)
def test_megatron_api_refusals(tok, body, message):
    with pytest.raises(RequestError, match=message):
        megatron_api_job(body, tok, None)


def test_openai_prompt_forms_and_defaults(tok):
    for prompt, ids, texts in (
        ("1 2", [[1, 2]], ["1 2"]),
        (["1", "2 3"], [[1], [2, 3]], ["1", "2 3"]),
        ([7, 8], [[7, 8]], None),
        ([[7], [8, 9]], [[7], [8, 9]], None),
    ):
        job, echo, got_texts = openai_completions_job({"prompt": prompt}, tok, 3)
        assert job.prompts == ids and got_texts == texts and echo is False
        assert job.max_new_tokens == OPENAI_DEFAULT_TOKENS and job.logprobs is None
    body = {"prompt": [1], "temperature": 0, "stop": "\n", "logprobs": 2, "echo": True,
            "max_tokens": 0}  # fmt: skip
    job, echo, _ = openai_completions_job(body, tok, 3)
    assert job.sampling.is_greedy and job.stop == ["\n"] and job.logprobs == 2 and echo


@pytest.mark.parametrize(
    "body, message",
    [
        ({"max_tokens": 4}, "prompt is required"),
        ({"prompt": [1], "n": 2}, "n > 1"),
        ({"prompt": [1], "stream": True}, "stream"),
        ({"prompt": [1], "max_tokens": 0}, "needs echo"),
        ({"prompt": [1], "logprobs": 6}, "logprobs must be in"),
        ({"prompt": [1], "temperature": 3}, "temperature"),
        ({"prompt": [1], "top_p": 0}, "top_p"),
        ({"prompt": [1], "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"prompt": [[1], "2"]}, "prompt must be"),
        ({"prompt": [50]}, r"token ids must be integers in \[0, 50\)"),
        ({"prompt": [[]]}, "prompt 0 is empty"),
    ],
)
def test_openai_refusals(tok, body, message):
    with pytest.raises(RequestError, match=message):
        openai_completions_job(body, tok, None)


def _done(job):
    """Completions as the engine fills them: logprobs of ids[1:] of prompt + new."""
    out = []
    for p in job.prompts:
        new = [p[-1] + 1, p[-1] + 2]
        n = len(p) + len(new) - 1
        lps = [-0.1 * (i + 1) for i in range(n)]
        tops = [{i: lps[i], i + 1: lps[i] - 1} for i in range(n)] if job.logprobs else None
        out.append(Completion(p, new, TOK.detokenize(new), "length", lps, tops))
    return out


def test_openai_response_logprobs_with_and_without_echo(tok):
    job, _, texts = openai_completions_job({"prompt": ["1 2 3"], "logprobs": 1}, tok, 0)
    (c,) = done = _done(job)
    plain = openai_completions_response(job, done, False, texts, TOK, "m")
    (choice,) = plain["choices"]
    assert choice["text"] == "4 5" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["4", "5"] and lp["token_logprobs"] == c.logprobs[2:]
    assert lp["top_logprobs"] == [{"2": c.logprobs[2], "3": c.logprobs[2] - 1},
                                  {"3": c.logprobs[3], "4": c.logprobs[3] - 1}]  # fmt: skip
    assert plain["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    echoed = openai_completions_response(job, done, True, texts, TOK, "m")["choices"][0]
    assert echoed["text"] == "1 2 34 5"  # the prompt as sent, then the completion
    lp = echoed["logprobs"]
    assert lp["tokens"] == ["1", "2", "3", "4", "5"]
    assert lp["token_logprobs"] == [None, *c.logprobs] and lp["top_logprobs"][0] is None


def test_megatron_api_response(tok):
    job = megatron_api_job({"prompts": ["1 2"], "logprobs": True}, tok, 0)
    done = _done(job)
    out = megatron_api_response(job, done, ["1 2"], TOK)
    assert out["text"] == ["1 23 4"] and out["tokens"] == [[1, 2, 3, 4]]
    assert out["segments"] == [["1", "2", "3", "4"]] and out["logprobs"] == [done[0].logprobs]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"max_tokens": 4}, "messages is required"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "non-empty list"),
        ({"messages": [{"role": "user", "content": "1"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": "1"}], "n": 3}, "n > 1"),
        ({"messages": [{"role": "user", "content": "1"}]}, "cannot render the messages"),
    ],
)
def test_chat_refusals(tok, body, message):
    from megatron_slm.serving.jobs import openai_chat_job

    with pytest.raises(RequestError, match=message):  # (the NullTokenizer has no chat template)
        openai_chat_job(body, tok, None)


def test_tokenizer_endpoints(tok):
    from megatron_slm.serving import tokenizer_api

    info = tokenizer_api.tokenizer_info(tok)
    assert info["eos_token"] == "49" and info["model_max_length"] == 16  # (EOD's text)
    out = tokenizer_api.tokenize({"prompt": "3 1 4", "add_special_tokens": False}, tok)
    assert out == {"tokens": [3, 1, 4], "count": 3, "max_model_len": 16}
    assert tokenizer_api.tokenize({"prompt": info["eos_token"]}, tok)["tokens"] == [TOK.eod]
    assert tokenizer_api.detokenize({"tokens": [3, 1, 4]}, tok) == {"prompt": "3 1 4"}
    assert tokenizer_api.detokenize({"tokens": []}, tok) == {"prompt": ""}
    with pytest.raises(RequestError, match="prompt must be a string"):
        tokenizer_api.tokenize({"prompt": [1]}, tok)
    with pytest.raises(RequestError, match=r"tokens: token ids must be integers in \[0, 50\)"):
        tokenizer_api.detokenize({"tokens": [1, 99]}, tok)
