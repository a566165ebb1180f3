"""Run a :class:`~megatron_slm.serving.jobs.Job` on a loaded model (collective over its TP group:
every rank calls it with the same job): decode each micro-batch of prompts, end completions at
end-of-document and the job's stop strings, and score the log probabilities asked for.

Log probabilities are those of the model's softmax over the real vocabulary (no temperature or
filter: Megatron-LM's and OpenAI's meaning), from one forward over ``prompt + generation`` after
decoding, in float32.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_slm.runtime import LoadedModel, forward_logits, generate
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
    """Fill each completion's log probabilities (and the ``top_n`` best per position)."""
    seqs = [c.prompt + c.new for c in done]
    width = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)  # right padding: causal, read by no real token
    logp = forward_logits(lm, tokens).log_softmax(-1)  # [b, width, vocab] fp32
    picked = logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0].cpu()
    best = logp[:, :-1].topk(top_n, dim=-1) if top_n else None
    for i, (c, s) in enumerate(zip(done, seqs)):
        n = len(s) - 1
        c.logprobs = picked[i, :n].tolist()
        if best is not None:
            vals, ids = best.values[i, :n].cpu().tolist(), best.indices[i, :n].cpu().tolist()
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
