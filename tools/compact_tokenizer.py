"""Compact tokenizer (RethinkTinyLM): count ids, prune a SentencePiece model, remap a checkpoint.

    # 1. id frequencies of the corpus tokenized with the large model, and the coverage curve
    #    (N -> share of counted tokens kept, tokens per byte on held-out text; the N each
    #    --curve-coverages value needs): a table, counts.coverage.json and counts.coverage.png
    python tools/compact_tokenizer.py count --data-path out/corpus_text_document \\
        --tokenizer-model big.model --output counts.npy --workers 8 --heldout heldout.jsonl
    # 2. keep N pieces (--vocab-size N, or --coverage 0.995: the smallest N covering 99.5% of
    #    the counted tokens): writes small.model, small.idmap.json (new id -> old id),
    #    small.report.json
    python tools/compact_tokenizer.py prune --tokenizer-model big.model --counts counts.npy \\
        --vocab-size 48000 --output small.model --heldout heldout.jsonl
    # 3. re-tokenize the corpus with small.model (tools/preprocess_data.py): ids are not a
    #    relabelling, removed pieces split into smaller ones
    # 4. carry a checkpoint trained with big.model over (any TP/PP; torchrun for several ranks)
    python tools/compact_tokenizer.py remap-checkpoint --load ckpt/big --id-map small.idmap.json \\
        --save ckpt/small

``--help`` after a command lists its flags. See ``megatron_slm.tinylm`` (``prune`` explains the
BPE merge closure).
"""

from __future__ import annotations

import sys

from megatron_slm.cli import Command
from megatron_slm.entry import entry_point
from megatron_slm.tinylm.compact_config import CountConfig, PruneConfig, RemapConfig

PROG = "compact_tokenizer"
COMMANDS = {
    "count": Command(CountConfig, "Token-id frequencies over indexed datasets."),
    "prune": Command(PruneConfig, "Prune a SentencePiece model to N pieces."),
    "remap-checkpoint": Command(RemapConfig, "A checkpoint's embedding/output rows by the id map."),
}


@entry_point(PROG, doc=__doc__, commands=COMMANDS)
def main(command: str, cfg: CountConfig | PruneConfig | RemapConfig) -> int:
    from megatron_slm.tinylm import compact
    from megatron_slm.tinylm.report import summary

    if command == "count":
        from megatron_slm.tinylm.coverage import curve_table

        meta, curve, skipped = compact.count(cfg)
        print(f"wrote {cfg.output}: {meta['num_tokens']} tokens, {meta['num_ids']} ids")
        if curve is None:
            print(skipped)
        else:
            print(curve_table(curve))
            print(f"wrote {curve['files']['png']}, {curve['files']['json']}")
    elif command == "prune":
        report = compact.prune(cfg)
        print(summary(report))
        print(f"wrote {cfg.output}, {report['files']['id_map']}")
    else:
        _remap(cfg)
    return 0


def _remap(cfg) -> None:
    import torch.distributed as dist

    from megatron_slm import launch
    from megatron_slm.runtime import plan_load
    from megatron_slm.tinylm import compact

    plan = plan_load(cfg, tokenizer="none")  # the checkpoint's metadata, read once
    device = launch.initialize_for(cfg)
    out = compact.remap(cfg, plan, device)
    if dist.get_rank() == 0:
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
