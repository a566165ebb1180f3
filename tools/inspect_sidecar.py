"""Inspect reference-loss sidecars: coverage, NaN count, mean and percentiles per dataset, the
fingerprint check, and optionally the top/bottom documents by mean reference loss as text.

    python tools/inspect_sidecar.py --data-path out/corpus_text_document --top 5 --bottom 5 \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model

Exit status 1 when any sidecar is missing or does not match its token dataset.
"""

import json
import sys

from megatron_slm.data.inspect import InspectConfig, format_report, inspect_sidecar
from megatron_slm.entry import entry_point

PROG = "inspect_sidecar"
GROUPS = {"inspection": InspectConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(cfg: InspectConfig) -> int:
    """Print one report per dataset; returns 1 if any check failed."""
    tokenizer = cfg.build_tokenizer() if cfg.top or cfg.bottom else None
    failed = False
    reports = []
    for prefix in cfg.prefixes:
        report = inspect_sidecar(prefix, top=cfg.top, bottom=cfg.bottom)
        failed |= not report["ok"]
        reports.append(report)
        if not cfg.json:
            data = None
            if tokenizer is not None and report["ok"]:
                from megatron.core.datasets.indexed_dataset import IndexedDataset

                data = IndexedDataset(prefix)
            print(format_report(report, tokenizer, data, cfg.max_chars))
    if cfg.json:
        print(json.dumps(reports, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
