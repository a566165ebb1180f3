"""ProX refining throughput of the two generation backends on CPU: documents/s and generated
tokens/s of the document and chunk stages.

    python benchmarks/bench_prox_refine.py [--docs 24] [--new-tokens 16] \\
        [--batch-sizes 8,32] [--concurrency 1,4,16]

A random Llama (``--layers``, ``--hidden``; a byte-level BPE tokenizer trained here and a
Zephyr-style chat template) is saved as a Hugging Face directory, and ``--docs`` synthetic
documents of 3-8 lines are turned into the prompts ``tools/prox_refine.py`` sends (strict
semantics; the chunk stage with ``--chunk-max-tokens 96``, so a document is one to three chunks).
Then, per stage, the same prompts go to:

- ``transformers``: the in-process backend (batched greedy ``generate`` with the KV cache), for
  each of ``--batch-sizes``;
- ``openai``: a local ``transformers serve`` of the same directory (started here, one process,
  CPU; ``--serve-args`` adds flags, e.g. ``--continuous-batching``), through the refine client,
  for each of ``--concurrency`` requests in flight.

The model has no EOS token, so every prompt generates exactly ``--new-tokens`` tokens (generated
tokens = prompts x new tokens). Both backends must give the same answers (checked: greedy). The
best setting of each backend is the row to compare.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import megatron_slm  # noqa: F401
except ImportError:
    sys.path.insert(0, REPO)

from megatron_slm.refine.backends import OpenAIGenerator, TransformersGenerator  # noqa: E402
from megatron_slm.refine.config import ModelConfig  # noqa: E402
from megatron_slm.refine.executor import AcceptanceRule  # noqa: E402
from megatron_slm.refine.sources import ModelRefiner  # noqa: E402

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = ["remove", "line", "the", "page", "cookie", "math", "sum", "of", "two", "home", "login"]


def make_model(path: str, layers: int, hidden: int) -> str:
    """A random Llama with a byte-level BPE tokenizer (300 pieces, trained on the benchmark's
    words) and :data:`TEMPLATE`, saved as a Hugging Face directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator([" ".join(WORDS)] * 50 + ["[000] [doc] [/doc] <|user|>"], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=1,
        eos_token_id=None,  # never stops early: every prompt generates exactly --new-tokens
    )  # fmt: skip
    LlamaForCausalLM(config).float().eval().save_pretrained(path)
    return path


def make_docs(n: int) -> list[str]:
    rng = random.Random(0)
    return [
        "\n".join(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
            for _ in range(rng.randint(3, 8))
        )
        for _ in range(n)
    ]


def stage_prompts(model: str, docs: list[str]) -> dict[str, list[str]]:
    config = ModelConfig(doc_model=model, chunk_model=model, chunk_max_tokens=96)
    refiner = ModelRefiner(config, AcceptanceRule())
    chunks = [p for d in docs for p in refiner._chunks(d)[0]]
    return {"doc": [refiner._doc_prompt(d)[0] for d in docs], "chunk": chunks}


def start_server(model: str, port: int, log_path: str, extra: list[str]) -> subprocess.Popen:
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    proc = subprocess.Popen(
        [cli, "serve", model, "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
         "--port", str(port), *extra],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited; see {log_path}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("transformers serve did not start")


def timed(generate, prompts, new_tokens):
    t0 = time.perf_counter()
    out = generate(prompts, new_tokens)
    return out, time.perf_counter() - t0, len(prompts) * new_tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--port", type=int, default=18777)
    p.add_argument("--serve-args", default="", help="extra `transformers serve` flags")
    args = p.parse_args(argv)
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(os.path.join(tmp, "model"), args.layers, args.hidden)
        docs = make_docs(args.docs)
        prompts = stage_prompts(model, docs)
        t0 = time.perf_counter()
        log = os.path.join(tmp, "serve.log")
        server = start_server(model, args.port, log, args.serve_args.split())
        print(f"server up in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        try:
            rows, answers = [], {}
            for batch in [int(b) for b in args.batch_sizes.split(",")]:
                gen = TransformersGenerator(model, "--doc-model", "cpu", "float32", batch)
                for stage, ps in prompts.items():
                    out, s, n = timed(gen.generate, ps, args.new_tokens)
                    answers.setdefault(stage, out)
                    assert out == answers[stage], "batch sizes disagree"
                    rows.append(("transformers", f"batch {batch}", stage, len(ps), s, n))
                    print(*rows[-1], file=sys.stderr, flush=True)
            for conc in [int(c) for c in args.concurrency.split(",")]:
                config = ModelConfig(doc_model=model, backend="openai", stage="doc",
                                     endpoint=f"http://127.0.0.1:{args.port}/v1",
                                     concurrency=conc)  # fmt: skip
                gen = OpenAIGenerator(model, "--doc-model", config)
                for stage, ps in prompts.items():
                    out, s, n = timed(gen.generate, ps, args.new_tokens)
                    assert out == answers[stage], f"openai answers differ ({stage})"
                    rows.append(("openai", f"concurrency {conc}", stage, len(ps), s, n))
                    print(*rows[-1], file=sys.stderr, flush=True)
        finally:
            server.terminate()
            server.wait()
    print(f"{args.docs} documents, {len(prompts['chunk'])} chunks, {args.new_tokens} new tokens "
          f"per prompt, model {args.layers} layers x {args.hidden}, torch threads "
          f"{torch.get_num_threads()}, serve args {args.serve_args!r}")  # fmt: skip
    print("| backend | setting | stage | prompts | seconds | documents/s | generated tokens/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for backend, setting, stage, n_prompts, s, n in rows:
        print(f"| {backend} | {setting} | {stage} | {n_prompts} | {s:.2f} | "
              f"{args.docs / s:.1f} | {n / s:,.0f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
