"""Seed annotation for the ProX refining models: a teacher LLM labels documents (doc stage) or
writes chunk programs (chunk stage), or existing programs are read (``--programs``); the valid
answers become chat-format SFT examples.

    python tools/prox_annotate.py --input 'raw/*.jsonl' --stage doc \\
        --teacher http://localhost:8000/v1 --teacher-model meta-llama/Llama-3.1-70B-Instruct \\
        --tokenizer refiner-hf/ --output doc_seeds.jsonl
    python tools/prox_annotate.py --input 'raw/*.jsonl' --stage chunk --teacher teacher-hf/ \\
        --tokenizer refiner-hf/ --output chunk_seeds.jsonl
    python tools/prox_annotate.py --input 'raw/*.jsonl' --stage chunk --programs programs.jsonl \\
        --tokenizer refiner-hf/ --output chunk_seeds.jsonl

The teacher is an OpenAI-compatible endpoint (vLLM, SGLang, ``transformers serve``; the API key
from $OPENAI_API_KEY or --api-key-env) or a local Hugging Face model directory. Rerun the same
command to resume: answers already in ``<output>.journal`` are never requested again. Train on the
seeds with ``python -m megatron_slm.pretrain --sft-data seeds.jsonl``. See
``megatron_slm.refine.annotate``.

``--programs`` (instead of ``--teacher``) distils programs you already have, in the format
``tools/prox_refine.py apply --programs`` reads (``{"id", "doc_program", "chunk_program"}`` per
line, matched by ``--id-key``): document labels as they are, document-wide chunk programs cut into
one program per chunk. No requests, no journal.
"""

import sys

from megatron_slm.entry import entry_point
from megatron_slm.refine.annotate import annotate
from megatron_slm.refine.annotate_config import AnnotateConfig

PROG = "prox_annotate"
GROUPS = {"annotation": AnnotateConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(config: AnnotateConfig) -> int:
    """Annotate; exit status 2 with one ``prog: error: ...`` line on bad input."""
    annotate(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
