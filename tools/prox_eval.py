"""Evaluate a ProX refining model on held-out seed examples (from ``tools/prox_annotate.py``):

    python tools/prox_eval.py --model refiner-hf/ --data heldout.jsonl --output eval.json

reports document-level precision/recall/F1 of the drop class, chunk-level line-removal F1 (lines
removed by the model vs by the reference program), normalize exact match and the program error
rate: a JSON report (``--output``, else stdout) and a printed summary. See
``megatron_slm.refine.evaluate`` and ``megatron_slm.refine.metrics``.
"""

import sys

from megatron_slm.entry import entry_point
from megatron_slm.refine.evaluate import EvalConfig, dumps, evaluate

PROG = "prox_eval"
GROUPS = {"evaluation": EvalConfig}


@entry_point(PROG, doc=__doc__, groups=GROUPS)
def main(config: EvalConfig) -> int:
    """Evaluate; exit status 2 with one ``prog: error: ...`` line on bad input."""
    report = evaluate(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    if not config.output:
        print(dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
