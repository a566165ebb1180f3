"""Refine a JSONL corpus with ProX programs (arXiv 2409.17115).

Model mode (the default command ``model``, which may be left out): the refining models write the
programs (document level, then chunk level):

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
``megatron_slm.refine.pipeline``. ``model --help`` and ``apply --help`` list each mode's flags.
"""

import sys

from megatron_slm.cli import Command
from megatron_slm.entry import entry_point
from megatron_slm.refine.config import ApplyConfig, ModelConfig, RunConfig
from megatron_slm.refine.pipeline import refine_corpus

PROG = "prox_refine"
COMMANDS = {
    "model": Command(
        {"run": RunConfig, "refining models": ModelConfig},
        "The refining models write the programs, then they are applied.",
    ),
    "apply": Command(
        {"run": RunConfig, "apply mode": ApplyConfig},
        "Apply programs produced elsewhere (no model).",
    ),
}


@entry_point(PROG, doc=__doc__, commands=COMMANDS, default_command="model", command_in_errors=True)
def main(command: str, configs: dict) -> int:
    """Refine; exit status 2 with one ``prog: error: ...`` line on bad input."""
    run, mode = configs.values()  # RunConfig, then ModelConfig or ApplyConfig
    refine_corpus(run, mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
