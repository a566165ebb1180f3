"""Inspect reference-loss sidecars: coverage, NaN count, mean and percentiles per dataset, the
fingerprint check, and optionally the top/bottom documents by mean reference loss as text.

    python tools/inspect_sidecar.py --data-path out/corpus_text_document --top 5 --bottom 5 \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model

Exit status 1 when any sidecar is missing or does not match its token dataset.
"""

import argparse
import json
import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.data.inspect import format_report, inspect_sidecar  # noqa: E402
from megatron_slm.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def get_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data-path", nargs="+", required=True, help="dataset prefixes (weights are ignored)"
    )
    p.add_argument("--top", type=int, default=0, help="show the N documents of highest mean")
    p.add_argument("--bottom", type=int, default=0, help="show the N documents of lowest mean")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--max-chars", type=int, default=300, help="text shown per document")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Print one report per dataset; returns 1 if any check failed."""
    args = get_args(argv)
    prefixes = [p for p in args.data_path if not _is_number(p)]
    tokenizer = None
    if args.tokenizer_type and (args.top or args.bottom):
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    failed = False
    reports = []
    for prefix in prefixes:
        report = inspect_sidecar(prefix, top=args.top, bottom=args.bottom)
        failed |= not report["ok"]
        reports.append(report)
        if not args.json:
            data = None
            if tokenizer is not None and report["ok"]:
                from megatron.core.datasets.indexed_dataset import IndexedDataset

                data = IndexedDataset(prefix)
            print(format_report(report, tokenizer, data, args.max_chars))
    if args.json:
        print(json.dumps(reports, indent=1))
    return 1 if failed else 0


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
