"""Refine a JSONL corpus with ProX programs (arXiv 2409.17115).

Model mode: the refining models write the programs (document level, then chunk level):

    python tools/prox_refine.py --input 'raw/*.jsonl' --output-dir refined/ --stage doc,chunk \\
        --doc-model prox-doc --chunk-model prox-chunk --backend transformers

Through an OpenAI-compatible server (vllm serve, SGLang, TGI, transformers serve; the scale path,
examples/prox_refine_vllm.sh): ``--backend openai --endpoint http://localhost:8000/v1``. To
reproduce a corpus refined by the released ProX models: ``--semantics prox --doc-template llama2``.

Apply mode: execute programs produced elsewhere (no model):

    python tools/prox_refine.py apply --input 'raw/*.jsonl' --programs programs.jsonl \\
        --output-dir refined/

writes ``refined/<shard>.jsonl`` (kept documents, for ``tools/preprocess_data.py``),
``refined/dropped/<shard>.jsonl`` and ``refined/stats.json``. Runs under torchrun, srun or a SLURM
array (``--shard-index/--num-shards``); rerun the same command to resume. See
``megatron_slm.refine.pipeline``.
"""

import sys

from megatron_slm.cli import build_parser, parse_configs
from megatron_slm.entry import entry_point
from megatron_slm.refine.config import ApplyConfig, ModelConfig, RunConfig
from megatron_slm.refine.pipeline import refine_corpus

PROG = "prox_refine"


def get_configs(argv=None):
    """``(RunConfig, ApplyConfig | ModelConfig)`` from the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["apply"]:
        groups = {"run": RunConfig, "apply mode": ApplyConfig}
        parser = build_parser(f"{PROG} apply", __doc__, groups)
        configs = parse_configs(parser, groups, argv[1:])
        return parser, configs["run"], configs["apply mode"]
    groups = {"run": RunConfig, "refining models": ModelConfig}
    parser = build_parser(PROG, __doc__, groups)
    configs = parse_configs(parser, groups, argv)
    return parser, configs["run"], configs["refining models"]


def _refine(argv) -> int:
    _, run, mode = get_configs(argv)
    refine_corpus(run, mode)
    return 0


_model_mode = entry_point(PROG)(_refine)
_apply_mode = entry_point(f"{PROG} apply")(_refine)


def main(argv=None) -> int:
    """Refine; exit status 2 with one ``prog: error: ...`` line on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return (_apply_mode if argv[:1] == ["apply"] else _model_mode)(argv)


if __name__ == "__main__":
    sys.exit(main())
