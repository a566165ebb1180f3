"""Merge tokenized datasets into one, with their reference-loss sidecars (Megatron-LM's
tools/merge_datasets.py flags).

    python tools/merge_datasets.py --input shards/ --output-prefix out/corpus_text_document

merges every ``<name>.bin/.idx`` of ``shards/`` (by name) into ``out/corpus_text_document``, and,
when every shard has one (``tools/score_corpus.py``), their sidecars into its sidecar; a mix of
scored and unscored shards is refused (``--no-sidecars`` merges the tokens alone).
``--input-prefixes A B C`` names the datasets and their order instead. See
``megatron_slm.data.merge``.
"""

import logging
import sys

from megatron_slm.data.merge import MergeConfig
from megatron_slm.entry import entry_point

PROG = "merge_datasets"
GROUPS = {"merging": MergeConfig}


@entry_point(PROG, log_level=logging.INFO, doc=__doc__, groups=GROUPS)
def main(cfg: MergeConfig) -> int:
    """Merge; prints the output prefix and its size."""
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # (a line per index read)
    result = cfg.run()
    sidecar = " and its reference-loss sidecar" if result.sidecar else ""
    print(f"{result.prefix}: {result.num_sequences} sequences, {result.num_tokens} tokens{sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
