"""Evaluate a model: mean token loss / perplexity per dataset and lm-evaluation-harness tasks.

    python tools/evaluate.py --load ckpt/run \\
        --perplexity-data wiki=data/wiki.jsonl data/web_text_document \\
        --lm-eval-tasks rho1_math arc_easy --output eval/report.json
    python tools/evaluate.py --load ckpt/run --lm-eval-tasks gsm8k_rho1 \\
        --lm-eval-metadata '{"gsm8k_path": "data/gsm8k_test.jsonl"}'

``--load`` is a megatron_slm checkpoint (its architecture and tokenizer are read from it) or a
Hugging Face Llama/Mistral directory. Perplexity data: JSONL (``--json-key`` field, or a ``tokens``
list) or indexed dataset prefixes. lm-eval tasks run through the ``megatron-slm`` lm-eval model
(``megatron_slm.evaluation.lm_eval_model``), with megatron-slm's tasks (Rho-1's GSM8K/MATH
protocol, ``qa_local``) on the include path. Runs with TP under torchrun
(``--tensor-model-parallel-size``); rank 0 prints the table and writes the JSON report.
"""

import logging
import sys

from megatron_slm import launch
from megatron_slm.entry import entry_point
from megatron_slm.evaluation import format_table, run_evaluation, write_report
from megatron_slm.evaluation.config import EvaluateConfig
from megatron_slm.evaluation.report import check_inputs
from megatron_slm.runtime import load_model, plan_load

PROG = "evaluate"
GROUPS = {"evaluation": EvaluateConfig}


@entry_point(PROG, log_level=logging.INFO, doc=__doc__, groups=GROUPS)
def main(cfg: EvaluateConfig) -> int:
    import torch.distributed as dist

    check_inputs(cfg.perplexity_data)  # before the model
    plan = plan_load(cfg)  # the model's description, read once, before any process group
    device = launch.initialize_for(cfg)
    model = load_model(plan, device)
    ckpt_seq = model.checkpoint.seq_length if model.checkpoint else None
    report = run_evaluation(
        model,
        perplexity_data=cfg.perplexity_data,
        seq_length=cfg.seq_length or ckpt_seq or model.arch.max_position_embeddings,
        micro_batch_size=cfg.micro_batch_size,
        json_key=cfg.json_key,
        append_eod=cfg.append_eod,
        max_documents=cfg.max_documents,
        lm_eval_tasks=cfg.lm_eval_tasks,
        lm_eval_options=cfg.lm_eval_options(),
    )
    if dist.get_rank() == 0:
        print(format_table(report))
        if cfg.output:
            write_report(report, cfg.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
