"""Run a :class:`~megatron_slm.serving.jobs.Job` on a loaded model (collective over its TP group:
every rank calls it with the same job): decode each micro-batch of prompts, end completions at
end-of-document and the job's stop strings, and score the log probabilities asked for.

Log probabilities are those of the model's softmax over the real vocabulary (no temperature or
filter: Megatron-LM's and OpenAI's meaning), from forwards over ``prompt + generation`` after
decoding, in float32.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_slm.runtime import LoadedModel, forward_logits, generate, sequence_losses
from megatron_slm.serving.jobs import Completion, Job


def _stop_fn(tokenizer, stops: list[str]):
    if not stops:
        return None

    def stop(row: int, new_ids: list[int]) -> bool:
        text = tokenizer.detokenize(new_ids)
        return any(s in text for s in stops)

    return stop


def _finish(tokenizer, eod: int, job: Job, prompt: list[int], new: list[int]) -> Completion:
    ended_at_eod = bool(new) and new[-1] == eod
    text = tokenizer.detokenize(new[:-1] if ended_at_eod else new)
    cut = [text.find(s) for s in job.stop if s in text]
    kept = [text.find(s) + len(s) for s in job.stop_kept if s in text]
    if cut:
        text = text[: min(cut)]
    elif kept:
        text = text[: min(kept)]
    stopped = ended_at_eod or bool(cut) or bool(kept)
    return Completion(prompt, new, text, "stop" if stopped else "length")


@torch.no_grad()
def _score(lm: LoadedModel, done: list[Completion], top_n: int) -> None:
    """Fill each completion's log probabilities: every token's from the fused loss over the
    batch (no gathered ``[tokens, vocab]`` tensor), and the ``top_n`` best per position from
    one row's gathered logits at a time (a 2048-token row of a 128k vocabulary is 1 GB in
    float32, a batch of them would not fit beside the model)."""
    seqs = [c.prompt + c.new for c in done]
    width = max(len(s) for s in seqs)
    if width < 2:  # one token: nothing before it to predict it from
        for c in done:
            c.logprobs, c.top_logprobs = [], [] if top_n else None
        return
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)  # right padding: causal, read by no real token
    losses = sequence_losses(lm, tokens)  # [b, width - 1], real vocabulary, float32
    for i, (c, s) in enumerate(zip(done, seqs)):
        n = len(s) - 1
        c.logprobs = (-losses[i, :n]).tolist()
        c.top_logprobs = [] if top_n else None  # (a one-token row has no position to rank)
        if top_n and n:
            logp = forward_logits(lm, tokens[i : i + 1, :n]).log_softmax(-1)[0]  # [n, vocab]
            best = logp.topk(top_n, dim=-1)
            ids, vals = best.indices.cpu().tolist(), best.values.cpu().tolist()
            c.top_logprobs = [dict(zip(k, v)) for k, v in zip(ids, vals)]


def run_job(lm: LoadedModel, job: Job, micro_batch_size: int) -> list[Completion]:
    """Every prompt's completion, in order; prompts are decoded ``micro_batch_size`` at a time,
    micro-batch ``m`` drawing with seed ``seed + m`` (a request gives the same text again)."""
    tokenizer = lm.tokenizer
    eod = tokenizer.eod
    stop = _stop_fn(tokenizer, job.stop + job.stop_kept)
    done: list[Completion] = []
    for m, start in enumerate(range(0, len(job.prompts), micro_batch_size)):
        prompts = job.prompts[start : start + micro_batch_size]
        sampling = dataclasses.replace(job.sampling, seed=job.sampling.seed + m)
        if job.max_new_tokens > 0:
            news = generate(
                lm, prompts, max_new_tokens=job.max_new_tokens, sampling=sampling, eod=eod,
                stop=stop,
            )  # fmt: skip
        else:
            news = [[] for _ in prompts]
        batch = [_finish(tokenizer, eod, job, p, n) for p, n in zip(prompts, news)]
        if job.logprobs is not None:
            _score(lm, batch, job.logprobs)
        done += batch
    return done
