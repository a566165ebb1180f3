"""Our checkpoints as an lm-evaluation-harness model, registered as ``megatron-slm``::

    lm_eval --model megatron-slm --model_args load=CKPT,tensor_model_parallel_size=2 \\
        --tasks arc_easy,gsm8k_rho1 --include_path $(python -m megatron_slm.evaluation.tasks)
    torchrun --nproc-per-node 2 -m lm_eval --model megatron-slm --model_args load=CKPT,...

``load`` is a megatron_slm checkpoint (root or ``iter_N``) or a Hugging Face Llama/Mistral
directory; no export step. Under torchrun every rank serves every request (tensor parallelism,
lm-eval's TP convention: each rank reports rank 0 and only ``LOCAL_RANK`` 0 writes results).

* ``loglikelihood`` / ``loglikelihood_rolling``: requests sorted by length (longest first) and
  batched; losses and greedy flags come from ``runtime.sequence_scores`` (vocab-parallel, the
  real vocabulary only), so they equal ``lm_eval --model hf`` on the exported model.
* ``generate_until``: batched greedy decoding with megatron-core's static KV cache
  (``runtime.greedy_generate``), stop sequences checked as tokens arrive, ``max_gen_toks``, and
  contexts left-truncated to ``max_length - max_gen_toks`` like the ``hf`` model.
* ``generate_until`` with ``tool_rounds: N`` in the task's ``generation_kwargs`` (the
  ``*_rho1_tora`` tasks; only this model knows the key): the tool-integrated loop of
  ``evaluation/tora.py``, each round one batched generation, programs run in the sandbox
  (``evaluation/sandbox.py``) by the first tensor-parallel rank, results broadcast.
Tokenization mirrors the ``hf`` model for Hugging Face tokenizers (``tokenizer.encode``; BOS
added by the tokenizer's own rule; the empty-context prefix is BOS, else EOS).

How ``lm_eval --model megatron-slm`` finds this class: lm-eval 0.4 has no plugin entry points, so
the wheel ships ``megatron_slm_lm_eval.pth`` (see ``megatron_slm/evaluation/lm_eval_hook.py``),
which registers a lazy placeholder when ``lm_eval.api.registry`` is imported.
"""

from __future__ import annotations

import atexit

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megatron_slm.errors import ConfigError
from megatron_slm.evaluation.sandbox import RunResult, Sandbox
from megatron_slm.evaluation.tora import tool_loop
from megatron_slm.runtime import LoadedModel, greedy_generate, sequence_scores

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _flag_int(name: str, value) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--model_args {name}={value!r}: not an integer") from None
    if out < 1:
        raise ConfigError(f"--model_args {name}={value!r}: must be >= 1")
    return out


@register_model("megatron-slm")
class MegatronSLMLM(TemplateLM):
    """An lm-eval LM over a :class:`~megatron_slm.runtime.LoadedModel`."""

    def __init__(
        self,
        load: str | None = None,
        model: LoadedModel | None = None,
        tensor_model_parallel_size: int = 1,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_batch_size: int | None = None,  # noqa: ARG002 - lm-eval passes it to every model
        max_length: int | None = None,
        max_gen_toks: int = 256,
        tokenizer_type: str | None = None,
        tokenizer_model: str | None = None,
        vocab_file: str | None = None,
        merge_file: str | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            raise ConfigError(f"--model_args: unknown argument(s) {', '.join(sorted(unused))}")
        if model is None:
            if load is None:
                raise ConfigError("--model_args: give load=CHECKPOINT")
            tok_args = dict(
                tokenizer_type=tokenizer_type,
                tokenizer_model=tokenizer_model,
                vocab_file=vocab_file,
                merge_file=merge_file,
            )
            model = self._load(load, tensor_model_parallel_size, device, dtype, tok_args)
        if model.tokenizer is None:
            raise ConfigError(f"{model.source}: no tokenizer known (give tokenizer_model=...)")
        self.lm = model
        self._batch_size = (
            8 if str(batch_size).startswith("auto") else _flag_int("batch_size", batch_size)
        )
        self._max_length = _flag_int("max_length", max_length) if max_length else None
        self._max_gen_toks = _flag_int("max_gen_toks", max_gen_toks)
        tok = model.tokenizer
        self._hf = getattr(tok, "_tok", None)  # transformers tokenizer behind ours, if any
        self.tokenizer = self._hf
        self._sandbox_obj: Sandbox | None = None  # made on the first tool-integrated request

    @staticmethod
    def _load(load, tp, device, dtype, tok_args: dict) -> LoadedModel:
        """lm-eval's CLI made us the entry point: set up the process group (and tear it down at
        exit) unless a caller already did."""
        from megatron.core import parallel_state

        from megatron_slm import launch
        from megatron_slm.data.tokenizer import TokenizerArgs
        from megatron_slm.evaluation.model import load_eval_model

        tp = _flag_int("tensor_model_parallel_size", tp)
        if dtype not in DTYPES:
            raise ConfigError(f"--model_args dtype={dtype!r}: one of {', '.join(DTYPES)}")
        if device in (None, "", "auto"):
            device = "auto"
        elif str(device).startswith("cuda"):
            # lm-eval's CLI passes cuda:0 unless told otherwise; like its hf model, fall back.
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device != "cpu":
            raise ConfigError(f"--device {device}: megatron-slm runs on cpu or cuda")
        if parallel_state.model_parallel_is_initialized():
            if parallel_state.get_tensor_model_parallel_world_size() != tp:
                raise ConfigError(
                    f"tensor_model_parallel_size={tp} but the process group has TP "
                    f"{parallel_state.get_tensor_model_parallel_world_size()}"
                )
            dev = (
                torch.device("cuda", torch.cuda.current_device())
                if (torch.cuda.is_available() and device != "cpu")
                else torch.device("cpu")
            )
        else:
            dev = launch.initialize(device=device, tensor_model_parallel_size=tp)
            atexit.register(launch.shutdown)
        return load_eval_model(
            load, dev, tokenizer_args=TokenizerArgs(**tok_args), params_dtype=DTYPES[dtype]
        )

    # ---- lm-eval's model facts -------------------------------------------------------------
    @property
    def device(self):
        return self.lm.device

    @property
    def eot_token_id(self) -> int:
        return self.lm.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        if self._hf is not None and self._hf.bos_token_id is not None:
            return self._hf.bos_token_id
        bos = self.lm.tokenizer.bos  # a Llama2Tokenizer's
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length or self.lm.arch.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lm.tokenizer, "identity", type(self.lm.tokenizer).__name__))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        if self._hf is None:
            tok = self.lm.tokenizer  # (a Llama2Tokenizer adds BOS unless asked not to)
            plain = add_special_tokens is False
            return list(tok.tokenize_plain(string) if plain else tok.tokenize(string))
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self._hf.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            kwargs["add_special_tokens"] = False  # the string brings its own BOS
        return self._hf.encode(string, **kwargs)

    def tok_decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        return self.lm.tokenizer.detokenize([i for i in ids if i != self.eot_token_id])

    # ---- scoring ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **unused):
        """(log p(continuation | context), continuation is greedy) per request."""

        def key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        collator = Collator(requests, sort_fn=key)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            rows = []
            for _, ctx, cont in chunk:
                # Like the hf model: the last max_length + 1 tokens, scored as one sequence.
                full = (ctx + cont)[-(self.max_length + 1) :]
                rows.append((full, len(cont)))
            width = max(len(f) for f, _ in rows)
            tokens = torch.zeros(len(rows), width, dtype=torch.long)  # [b, s + 1], right-padded
            for i, (full, _) in enumerate(rows):
                tokens[i, : len(full)] = torch.tensor(full)
            losses, greedy = sequence_scores(self.lm, tokens)  # [b, s] each
            for i, (full, n_cont) in enumerate(rows):
                span = slice(len(full) - 1 - n_cont, len(full) - 1)
                answer = (-float(losses[i, span].double().sum()), bool(greedy[i, span].all()))
                results.append(answer)
                self.cache_hook.add_partial("loglikelihood", chunk[i][0], answer)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(((None, None), ctx, cont))
                owners.append(idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for idx, (logprob, _) in zip(owners, scores):
            totals[idx] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos = (
            self.tok_decode([self.eot_token_id])
            if self._hf is None
            else self._hf.decode([self.eot_token_id])
        )
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ConfigError("megatron-slm decodes greedily only (do_sample=False)")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = kwargs.pop("max_gen_toks")
            rounds = kwargs.pop("tool_rounds", None)
            if rounds:
                # Tool-integrated tasks (tora.py): a round never takes more than half the window,
                # so the growing context keeps the other half.
                budget = max(1, min(budget, self.max_length // 2))
                texts = tool_loop(
                    list(contexts),
                    lambda ctxs, until=until, budget=budget: self._generate(ctxs, until, budget),
                    self._run_programs,
                    rounds=int(rounds),
                )
            else:
                texts = self._generate(contexts, until, budget)
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    def _generate(self, contexts, until: list[str], budget: int) -> list[str]:
        """One batch of greedy generations, each cut at the first stop sequence."""
        max_ctx = self.max_length - budget
        if max_ctx < 1:
            raise ConfigError(
                f"max_gen_toks {budget} leaves no context within max_length {self.max_length}"
            )
        prompts = [self.tok_encode(c)[-max_ctx:] for c in contexts]

        def stop(row: int, new_ids: list[int], until=tuple(until)) -> bool:
            text = self.tok_decode(new_ids)
            return any(s and s in text for s in until)

        outs = greedy_generate(
            self.lm,
            prompts,
            max_new_tokens=budget,
            eod=self.eot_token_id,
            stop=stop,
            max_length=self.max_length,
        )
        return [postprocess_generated_text(self.tok_decode(new), until, None) for new in outs]

    def _run_programs(self, programs: list[str]) -> list[RunResult]:
        """Run a round's programs in the sandbox on the first rank of the tensor-parallel group
        and broadcast the results: every rank must extend its prompts with the same text."""
        from megatron.core import parallel_state

        tp = (
            parallel_state.get_tensor_model_parallel_world_size()
            if parallel_state.model_parallel_is_initialized()
            else 1
        )
        if tp == 1:
            return self._sandbox().run_many(programs)
        src = parallel_state.get_tensor_model_parallel_src_rank()
        box = [self._sandbox().run_many(programs) if torch.distributed.get_rank() == src else None]
        group = parallel_state.get_tensor_model_parallel_group()
        torch.distributed.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def _sandbox(self) -> Sandbox:
        if self._sandbox_obj is None:
            self._sandbox_obj = Sandbox()
        return self._sandbox_obj
