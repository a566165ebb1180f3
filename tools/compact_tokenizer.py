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

See ``megatron_slm.tinylm`` (``prune`` explains the BPE merge closure).
"""

from __future__ import annotations

import argparse
import sys

from megatron_slm.cli import ArgumentParser, add_config_arguments, config_from_namespace
from megatron_slm.entry import entry_point
from megatron_slm.tinylm.compact_config import CountConfig, PruneConfig, RemapConfig

PROG = "compact_tokenizer"
COMMANDS = {
    "count": (CountConfig, "Token-id frequencies over indexed datasets."),
    "prune": (PruneConfig, "Prune a SentencePiece model to N pieces."),
    "remap-checkpoint": (RemapConfig, "Embedding/output rows of a checkpoint by the id map."),
}


def get_config(argv=None):
    parser = ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {}
    for name, (cls, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.prog = f"{PROG} {name}"
        add_config_arguments(p, cls)
        subparsers[name] = p
    ns = parser.parse_args(argv)
    try:
        return ns.command, config_from_namespace(COMMANDS[ns.command][0], ns)
    except ValueError as e:
        subparsers[ns.command].error(str(e))


@entry_point(PROG)
def main(argv=None) -> int:
    command, cfg = get_config(argv)
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
    device = launch.initialize(
        device=cfg.device,
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
    )
    out = compact.remap(cfg, plan, device)
    if dist.get_rank() == 0:
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
