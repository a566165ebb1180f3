"""Evaluate a model: mean token loss / perplexity per dataset and few-shot QA exact match.

    python tools/evaluate.py --load ckpt/run \\
        --perplexity-data wiki=data/wiki.jsonl data/web_text_document \\
        --fewshot-data gsm=data/gsm8k_test.jsonl --num-shots 4 --answer-extraction last-number \\
        --output eval/report.json

``--load`` is a megatron_slm checkpoint or a Hugging Face Llama/Mistral directory. Perplexity data:
JSONL (``--json-key`` field, or a ``tokens`` list) or indexed dataset prefixes; few-shot data:
JSONL with ``question`` and ``answer``. Runs with TP under torchrun
(``--tensor-model-parallel-size``); rank 0 prints the table and writes the JSON report.
"""

import argparse
import logging
import os
import sys

try:
    import megatron_slm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_slm.data.tokenizer import TOKENIZER_TYPES  # noqa: E402
from megatron_slm.evaluation import (  # noqa: E402
    FewShotConfig,
    format_table,
    load_model,
    run_evaluation,
    write_report,
)
from megatron_slm.evaluation.fewshot import RULES  # noqa: E402


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape")


def get_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--load", required=True, help="megatron_slm checkpoint or HF model directory")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--transformer-impl", default=None, choices=("te", "local", "torch"))
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--output", default=None, help="JSON report path")
    g = p.add_argument_group("perplexity")
    g.add_argument("--perplexity-data", nargs="*", default=[], help="[name=]path ...")
    g.add_argument("--seq-length", type=int, default=1024)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--json-key", default="text")
    g.add_argument("--append-eod", action="store_true", help="score an EOD after each document")
    g.add_argument("--max-documents", type=int, default=None)
    g = p.add_argument_group("few-shot QA")
    g.add_argument("--fewshot-data", nargs="*", default=[], help="[name=]path.jsonl ...")
    g.add_argument("--fewshot-shots", default=None, help="JSONL of shots (default: first k)")
    g.add_argument("--num-shots", type=int, default=0)
    g.add_argument("--prompt-template", default=FewShotConfig.prompt_template)
    g.add_argument("--answer-template", default=FewShotConfig.answer_template)
    g.add_argument("--shot-separator", default=FewShotConfig.separator)
    g.add_argument("--stop", nargs="*", default=list(FewShotConfig.stop))
    g.add_argument("--max-new-tokens", type=int, default=FewShotConfig.max_new_tokens)
    g.add_argument("--answer-extraction", default=FewShotConfig.extraction, help=" | ".join(RULES))
    g.add_argument("--gold-extraction", default=FewShotConfig.gold_extraction)
    g.add_argument("--ignore-case", action="store_true")
    g.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    if not args.perplexity_data and not args.fewshot_data:
        p.error("nothing to do: give --perplexity-data and/or --fewshot-data")
    return args


def main(argv=None) -> int:
    import torch.distributed as dist

    from megatron_slm.launch import shutdown

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = get_args(argv)
    owns_process_group = not dist.is_initialized()  # else a caller's (tests) stays up
    fewshot = FewShotConfig(
        num_shots=args.num_shots,
        # Templates and stops accept escapes such as "\n" from the shell.
        prompt_template=_unescape(args.prompt_template),
        answer_template=_unescape(args.answer_template),
        separator=_unescape(args.shot_separator),
        stop=tuple(_unescape(s) for s in args.stop),
        max_new_tokens=args.max_new_tokens,
        extraction=args.answer_extraction,
        gold_extraction=args.gold_extraction,
        ignore_case=args.ignore_case,
        limit=args.limit,
    )
    try:
        model = load_model(
            args.load,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            device=args.device,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            vocab_size=args.vocab_size,
            transformer_impl=args.transformer_impl,
        )
        report = run_evaluation(
            model,
            perplexity_data=args.perplexity_data,
            fewshot_data=args.fewshot_data,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            json_key=args.json_key,
            append_eod=args.append_eod,
            max_documents=args.max_documents,
            fewshot=fewshot,
            shots_path=args.fewshot_shots,
        )
        if dist.get_rank() == 0:
            print(format_table(report))
            if args.output:
                write_report(report, args.output)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if owns_process_group:
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
