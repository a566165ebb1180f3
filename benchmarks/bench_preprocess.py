"""Preprocessing throughput against its anchor, plain sentencepiece encoding of the same text.

    python benchmarks/bench_preprocess.py [--docs 20000] [--repeat 3]

Measures, in one run and on one synthetic JSONL corpus (Zipf-distributed pseudo-words, some
unicode, documents of varied length):

- ``plain``: ``sp.encode(list_of_texts, num_threads=1)`` in batches over the texts already in
  memory (no JSON, no I/O): the anchor, one core.
- ``preprocess (workers=N)``: ``preprocess_corpus`` end to end (read, JSON parse, tokenize,
  write .bin/.idx, rename), for N = 1 and 2.

Prints tokens/s and the per-worker ratio ``(tokens/s / N) / plain``; acceptance (issue 4):
>= 0.83 (overhead over plain encoding at most 20% per worker). Best of ``--repeat`` runs each, to
damp the noise of a shared machine. Also checks that 1 and 2 workers write identical bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import tempfile
import time

import numpy as np

try:
    import megatron_slm  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.data.preprocess import _BATCH_LINES, preprocess_corpus  # noqa: E402
from megatron_slm.data.tokenizer import train_sentencepiece  # noqa: E402


def make_corpus(path: str, n_docs: int, seed: int = 0) -> list[str]:
    """Write ``n_docs`` JSONL documents; returns their texts."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["é", "ü", "ñ", "日", "本", "😀"]
    words = ["".join(rng.choice(letters[:26], size=rng.integers(1, 10))) for _ in range(5000)]
    words += ["".join(rng.choice(letters, size=rng.integers(1, 4))) for _ in range(200)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    texts = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            n = int(rng.choice([20, 100, 300, 1000]))
            ws = rng.choice(len(words), size=n, p=zipf)
            text = " ".join(words[i] for i in ws)
            text = text.replace(" a ", ". A ").replace(" of ", ", of\n")
            texts.append(text)
            f.write(json.dumps({"text": text, "id": len(texts)}, ensure_ascii=False) + "\n")
    return texts


def bench_plain(model: str, texts: list[str]) -> tuple[float, int]:
    """Plain sentencepiece encoding, batched like preprocessing: (seconds, tokens)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), _BATCH_LINES):
        n += sum(map(len, sp.encode(texts[i : i + _BATCH_LINES], num_threads=1)))
    return time.perf_counter() - t0, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--vocab-size", type=int, default=8000)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        jsonl = os.path.join(tmp, "corpus.jsonl")
        texts = make_corpus(jsonl, args.docs)
        model = train_sentencepiece(texts[:2000], os.path.join(tmp, "sp"), args.vocab_size)
        mb = os.path.getsize(jsonl) / 1e6
        print(f"corpus: {args.docs} docs, {mb:.1f} MB JSONL, sentencepiece bpe {args.vocab_size}")

        best: dict[str, float] = {}
        tokens = 0
        for _ in range(args.repeat):  # interleaved, so slow phases of the machine hit all
            dt, tokens = bench_plain(model, texts)
            best["plain"] = max(best.get("plain", 0.0), tokens / dt)
            for w in (1, 2):
                res = preprocess_corpus(
                    [jsonl],
                    os.path.join(tmp, f"w{w}"),
                    "SentencePieceTokenizer",
                    tokenizer_model=model,
                    workers=w,
                    log_interval=0,
                )
                assert res.num_tokens == tokens, (res.num_tokens, tokens)
                best[f"w{w}"] = max(best.get(f"w{w}", 0.0), res.num_tokens / res.elapsed_s)
        for ext in (".bin", ".idx"):
            a, b = (os.path.join(tmp, f"w{w}_text_document{ext}") for w in (1, 2))
            assert filecmp.cmp(a, b, shallow=False), f"1 and 2 workers differ in {ext}"

    plain = best["plain"]
    print(f"tokens: {tokens}   (best of {args.repeat}, {os.cpu_count()} cores)")
    print(f"{'':28s} {'tokens/s':>12s} {'per worker':>12s} {'ratio':>8s}")
    print(f"{'plain sp.encode (1 core)':28s} {plain:12.0f} {plain:12.0f} {1.0:8.3f}")
    ok = True
    for w in (1, 2):
        tps = best[f"w{w}"]
        ratio = tps / w / plain
        ok &= ratio >= 0.83
        print(f"{f'preprocess workers={w}':28s} {tps:12.0f} {tps / w:12.0f} {ratio:8.3f}")
    print("identical bytes for 1 and 2 workers: yes")
    print(f"acceptance (per-worker ratio >= 0.83): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
