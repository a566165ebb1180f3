"""Tokenize JSONL into megatron-core indexed datasets (Megatron-LM's flag names).

    python tools/preprocess_data.py --input 'data/*.jsonl' --output-prefix out/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod \\
        --workers 8

writes ``out/corpus_text_document.bin/.idx``. See ``megatron_slm.data.preprocess_corpus``.
"""

import logging
import sys

from megatron_slm.data.preprocess import PreprocessConfig
from megatron_slm.entry import entry_point

PROG = "preprocess_data"
GROUPS = {"preprocessing": PreprocessConfig}


@entry_point(PROG, log_level=logging.INFO, doc=__doc__, groups=GROUPS)
def main(cfg: PreprocessConfig) -> int:
    """Run preprocessing; prints the output prefixes."""
    result = cfg.run()  # its first step: every --input names a file (else one line, exit 2)
    for key, prefix in result.items():
        print(f"{key}: {prefix}")
    if result.skipped_lines:
        print(f"skipped {result.skipped_lines} malformed lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
