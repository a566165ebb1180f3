"""Generation backends for the refining models, both greedy:

* ``transformers``: the Hugging Face causal-LM directory (a released ProX refining model, or one
  exported by ``tools/convert_checkpoint.py``) loaded in process, any device;
* ``openai``: any OpenAI-compatible server (``vllm serve``, SGLang, TGI, ``transformers serve``)
  through its ``/completions`` endpoint, with the annotate stage's client (concurrency, retries
  with backoff, timeouts) and a journal of the answers. This is the scale path: one ``vllm serve``
  per node (examples/prox_refine_vllm.sh).

A prompt is rendered here, never by the server: a string (tokenized without special tokens: the
chat template writes its own) or token ids (``--semantics prox``: the ids ProX's code sent). Neither
torch nor transformers is imported at module load.
"""

from __future__ import annotations

import os

from megatron_slm.errors import TokenizerError, UserError
from megatron_slm.remote_code import load_auto_tokenizer, needs_trust, refusal

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class BackendError(UserError):
    pass


def load_tokenizer(
    model_dir: str, flag: str, sentencepiece_ok: bool = False, trust_remote_code: bool = False
):
    """The model's tokenizer; a BackendError naming ``flag`` when the directory has none or the
    tokenizer has no chat template. With ``sentencepiece_ok``, ``model_dir`` may also be the
    SentencePiece ``.model`` a refining model is about to be trained with: the tokenizer is then
    the one ``tools/convert_checkpoint.py`` will export for it (the default chat template), so
    seeds can be chunked before the model exists."""
    if sentencepiece_ok and os.path.isfile(model_dir):
        return _exported_sentencepiece_tokenizer(model_dir, flag)
    if not os.path.isdir(model_dir):
        raise BackendError(f"{flag} {model_dir}: not a directory")
    if not any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise BackendError(
            f"{flag} {model_dir}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
        )
    try:  # (code the directory ships runs only with --trust-remote-code)
        tokenizer = load_auto_tokenizer(model_dir, trust_remote_code, f"{flag} {model_dir}")
    except TokenizerError as e:
        raise BackendError(str(e)) from None
    if not getattr(tokenizer, "chat_template", None):
        raise BackendError(
            f"{flag} {model_dir}: the tokenizer has no chat template (tokenizer_config.json "
            f"'chat_template' or chat_template.jinja); the refining prompts are rendered with it"
        )
    return tokenizer


def _exported_sentencepiece_tokenizer(model_file: str, flag: str):
    import tempfile

    from megatron_slm.convert.tokenizer_export import write_sentencepiece_hf_tokenizer
    from megatron_slm.data.chat import DEFAULT_CHAT_TEMPLATE

    with tempfile.TemporaryDirectory() as tmp:
        try:
            write_sentencepiece_hf_tokenizer(model_file, tmp, DEFAULT_CHAT_TEMPLATE)
        except UserError as e:  # a SentencePiece model the export refuses: its own reason
            raise BackendError(f"{flag} {e}") from None
        except Exception as e:  # protobuf DecodeError, ...
            reason = " ".join(str(e).split())[:200]
            raise BackendError(
                f"{flag} {model_file}: not a SentencePiece model nor a tokenizer directory "
                f"({type(e).__name__}: {reason})"
            ) from None
        return load_tokenizer(tmp, flag)  # read into memory: the directory can go


def _batches(order: list[int], size: int):
    for i in range(0, len(order), size):
        yield order[i : i + size]


class TransformersGenerator:
    """Batched greedy ``generate`` with the KV cache; prompts are sorted by length so each batch
    pads little. Batches depend only on the prompts given, never on the rank layout."""

    def __init__(
        self,
        model_dir: str,
        flag: str,
        device: str,
        dtype: str,
        batch_size: int,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        self.tokenizer = load_tokenizer(model_dir, flag, trust_remote_code=trust_remote_code)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {
            "auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[dtype]
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        except Exception as e:
            if needs_trust(e, trust_remote_code):
                raise BackendError(f"{flag} {model_dir}: {refusal('model')}") from None
            reason = " ".join(str(e).split())[:300]
            raise BackendError(f"{flag} {model_dir}: cannot load the model ({reason})") from None
        self.model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = pad

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: list[str | list[int]], max_new_tokens: int) -> list[str]:
        import torch

        encoded = [self.encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        outputs: list[str] = [""] * len(prompts)
        for batch in _batches(order, self.batch_size):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: generation continues every row
                n = len(encoded[i])
                ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, width - n :] = 1
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.pad_id,
                    use_cache=True,
                )
            for row, i in enumerate(batch):
                text = self.tokenizer.decode(out[row, width:], skip_special_tokens=True)
                outputs[i] = text.strip(" ")
        return outputs


class OpenAIGenerator:
    """Greedy completions from an OpenAI-compatible server, ``concurrency`` requests in flight.
    With :attr:`journal` set, answers already journaled are not requested again and new ones
    are journaled as they arrive.

    The model must see exactly the ids the transformers backend would feed it. A server tokenizes
    a text prompt with the tokenizer's special tokens added (vLLM, SGLang, ``transformers
    serve``): the prompt goes as text when that gives those ids (no BOS added by the tokenizer,
    or prox's chunk prompts, which mean it), else as token ids (vllm serve and SGLang take them;
    ``transformers serve`` answers HTTP 400, a clear error)."""

    def __init__(self, model_dir: str, flag: str, config):
        from megatron_slm.refine.teachers import OpenAICompletions

        self.tokenizer = load_tokenizer(model_dir, flag, trust_remote_code=config.trust_remote_code)
        self.client = OpenAICompletions(
            config.endpoint,
            config.model or model_dir,  # `vllm serve DIR` names the model DIR
            api_key=os.environ.get(API_KEY_ENV) or None,
            timeout=config.request_timeout,
            max_retries=config.max_retries,
            backoff=config.retry_backoff,
            concurrency=config.concurrency,
            log=_log_warning,
            allow_insecure_http=config.endpoint_allow_insecure_http,
            flag="--endpoint",
            insecure_flag="--endpoint-allow-insecure-http",
        )
        self.journal = None

    def generate(self, prompts: list[str | list[int]], max_new_tokens: int) -> list[str]:
        from megatron_slm.refine.journal import request_key
        from megatron_slm.refine.teachers import TeacherError

        ids = [self.encode(p) for p in prompts]
        keys = [request_key(self.client.model, max_new_tokens, i) for i in ids]
        answers = dict(self.journal.answers) if self.journal is not None else {}
        todo = {}
        for key, prompt, prompt_ids in zip(keys, prompts, ids):
            if key not in answers and key not in todo:
                todo[key] = self._wire(prompt, prompt_ids)

        def on_answer(key: str, answer: str | None, error: str | None) -> None:
            if answer is None:  # a 200 that is no completion: a broken server, not a program
                raise BackendError(f"--endpoint {self.client.url}: {error}")
            answers[key] = answer
            if self.journal is not None:
                self.journal.add(key, answer)

        try:
            self.client.answer_all(list(todo.items()), max_new_tokens, on_answer)
        except TeacherError as e:
            raise BackendError(str(e)) from None
        return [answers[k].strip(" ") for k in keys]

    def encode(self, prompt: str | list[int]) -> list[int]:
        """The ids the model sees (as :meth:`TransformersGenerator.encode`)."""
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _wire(self, prompt: str | list[int], ids: list[int]) -> str | list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            candidates = [prompt]
        else:  # the text whose tokenization, with what the tokenizer adds, is ``ids``
            added = tok("")["input_ids"]
            body = ids[len(added) :] if added and ids[: len(added)] == added else ids
            decode = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
            candidates = [tok.decode(body, **decode), tok.decode(ids, **decode)]
        for text in candidates:
            if tok(text)["input_ids"] == ids:
                return text
        return ids


API_KEY_ENV = "OPENAI_API_KEY"
"""The API key of ``--backend openai`` (sent to the endpoint's own origin only), if set."""


def _log_warning(message: str) -> None:
    import logging

    logging.getLogger("megatron_slm.refine").warning(message)


def load_generator(config, stage: str):
    """The generator of ``stage`` ("doc" or "chunk") for a ``ModelConfig``."""
    model_dir = config.doc_model if stage == "doc" else config.chunk_model
    flag = f"--{stage}-model"
    if config.backend == "openai":
        return OpenAIGenerator(model_dir, flag, config)
    return TransformersGenerator(
        model_dir, flag, config.device, config.dtype, config.batch_size, config.trust_remote_code
    )
