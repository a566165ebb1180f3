"""Train a sentencepiece tokenizer on JSONL text (a compact vocabulary for small models).

python tools/train_tokenizer.py --input data/*.jsonl --model-prefix out/tok --vocab-size 512
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.data.jsonl import iter_jsonl
from megatron_slm.data.preprocess import expand_inputs
from megatron_slm.data.tokenizer import train_sentencepiece


def iter_texts(patterns, key, max_docs):
    n = 0
    for path in expand_inputs(patterns):
        for line_no, record in iter_jsonl(path):
            if key not in record:
                raise ValueError(f"{path}:{line_no}: no {key!r} field")
            yield record[key]
            n += 1
            if max_docs and n >= max_docs:
                return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL files or globs")
    p.add_argument("--json-key", default="text")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N documents")
    args = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.model_prefix)), exist_ok=True)
    texts = list(iter_texts(args.input, args.json_key, args.max_docs))
    path = train_sentencepiece(texts, args.model_prefix, args.vocab_size, args.model_type)
    print(f"wrote {path} ({len(texts)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
