"""Tokenize JSONL into megatron-core indexed datasets (Megatron-LM's flag names).

    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix out/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod \\
        --workers 8

writes ``out/corpus_text_document.bin/.idx``. See ``megatron_slm.data.preprocess_corpus``.
"""

import argparse
import logging
import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.data.preprocess import preprocess_corpus  # noqa: E402
from megatron_slm.data.tokenizer import TOKENIZER_TYPES  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, help="JSONL files or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece model / HF directory")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--append-eod", action="store_true", help="append EOD to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.*")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    g.add_argument("--log-interval", type=int, default=10000, help="documents between logs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run preprocessing; prints the output prefixes."""
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    result = preprocess_corpus(
        args.input,
        args.output_prefix,
        args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        skip_bad_lines=args.skip_bad_lines,
        log_interval=args.log_interval,
    )
    for key, prefix in result.items():
        print(f"{key}: {prefix}")
    if result.skipped_lines:
        print(f"skipped {result.skipped_lines} malformed lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
