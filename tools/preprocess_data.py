"""Tokenize JSONL into megatron-core indexed datasets (Megatron-LM's flag names).

    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix out/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod \\
        --workers 8

writes ``out/corpus_text_document.bin/.idx``. See ``megatron_slm.data.preprocess_corpus``.
"""

import logging
import sys

from megatron_slm.cli import build_parser
from megatron_slm.data.preprocess import PreprocessConfig, parse_input_config
from megatron_slm.entry import entry_point

PROG = "preprocess_data"
GROUPS = {"preprocessing": PreprocessConfig}


def get_parser():
    return build_parser(PROG, __doc__, GROUPS)


def get_config(argv=None) -> PreprocessConfig:
    """Parse (and validate) the command line; errors exit with status 2 naming the flag."""
    return parse_input_config(get_parser(), GROUPS, "preprocessing", argv)


@entry_point(PROG, log_level=logging.INFO)
def main(argv=None) -> int:
    """Run preprocessing; prints the output prefixes."""
    cfg = get_config(argv)
    result = cfg.run()
    for key, prefix in result.items():
        print(f"{key}: {prefix}")
    if result.skipped_lines:
        print(f"skipped {result.skipped_lines} malformed lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
