"""Evaluate a model: mean token loss / perplexity per dataset and few-shot QA exact match.

    python tools/evaluate.py --load ckpt/run \\
        --perplexity-data wiki=data/wiki.jsonl data/web_text_document \\
        --fewshot-data gsm=data/gsm8k_test.jsonl --num-shots 4 --answer-extraction last-number \\
        --output eval/report.json

``--load`` is a megatron_slm checkpoint (its architecture and tokenizer are read from it) or a
Hugging Face Llama/Mistral directory. Perplexity data: JSONL (``--json-key`` field, or a ``tokens``
list) or indexed dataset prefixes; few-shot data: JSONL with ``question`` and ``answer``. Runs with
TP under torchrun (``--tensor-model-parallel-size``); rank 0 prints the table and writes the JSON
report.
"""

import dataclasses
import logging
import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm import launch  # noqa: E402
from megatron_slm.cli import build_parser, parse_configs  # noqa: E402
from megatron_slm.entry import entry_point  # noqa: E402
from megatron_slm.evaluation import (  # noqa: E402
    FewShotConfig,
    format_table,
    load_eval_model,
    run_evaluation,
    write_report,
)
from megatron_slm.evaluation.config import EvaluateConfig  # noqa: E402
from megatron_slm.evaluation.report import check_inputs  # noqa: E402

PROG = "evaluate"
GROUPS = {"evaluation": EvaluateConfig, "few-shot QA": FewShotConfig}


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape")


@entry_point(PROG)
def main(argv=None) -> int:
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    configs = parse_configs(build_parser(PROG, __doc__, GROUPS), GROUPS, argv)
    cfg, fewshot = configs["evaluation"], configs["few-shot QA"]
    # Templates and stops accept escapes such as "\n" from the shell.
    fewshot = dataclasses.replace(
        fewshot,
        prompt_template=_unescape(fewshot.prompt_template),
        answer_template=_unescape(fewshot.answer_template),
        shot_separator=_unescape(fewshot.shot_separator),
        stop=[_unescape(s) for s in fewshot.stop],
    )
    check_inputs(cfg.perplexity_data, cfg.fewshot_data, fewshot.fewshot_shots)  # before the model
    device = launch.initialize(
        device=cfg.device, tensor_model_parallel_size=cfg.tensor_model_parallel_size
    )
    model = load_eval_model(cfg.load, device, model_args=cfg, tokenizer_args=cfg)
    ckpt_seq = model.checkpoint.seq_length if model.checkpoint else None
    report = run_evaluation(
        model,
        perplexity_data=cfg.perplexity_data,
        fewshot_data=cfg.fewshot_data,
        seq_length=cfg.seq_length or ckpt_seq or model.arch.max_position_embeddings,
        micro_batch_size=cfg.micro_batch_size,
        json_key=cfg.json_key,
        append_eod=cfg.append_eod,
        max_documents=cfg.max_documents,
        fewshot=fewshot,
        shots_path=fewshot.fewshot_shots,
    )
    if dist.get_rank() == 0:
        print(format_table(report))
        if cfg.output:
            write_report(report, cfg.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
