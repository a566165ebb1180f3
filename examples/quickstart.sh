#!/usr/bin/env bash
# Quickstart: the whole Selective Language Modeling pipeline on the bundled sample corpus, on CPU.
#
#   bash examples/quickstart.sh            # sets up .venv, then about 10 minutes on 2 cores
#
# 1. a compact tokenizer: a 1000-piece sentencepiece model, counted on the clean corpus (with the
#    coverage curve: N -> coverage, held-out tokens per byte, the N --coverage 0.995 keeps;
#    $OUT/counts.coverage.png) and pruned to 512 pieces
#                                           (tools/train_tokenizer.py, tools/compact_tokenizer.py)
# 2. indexed datasets of the clean and noisy corpora   (tools/preprocess_data.py)
# 3. a reference model trained on clean text            (python -m megatron_slm.pretrain)
# 4. the noisy corpus scored offline into a sidecar     (tools/score_corpus.py)
# 5. Rho-1 training on the noisy corpus, top 60% tokens by excess loss, and a plain baseline
# 6. ProX: seed programs from a rule-based labeller (tools/prox_annotate.py --programs), a 2-layer
#    refining model fine-tuned on them (pretrain --sft-data), exported and scored on held-out
#    seeds (tools/prox_eval.py); the noisy corpus refined by it (tools/prox_refine.py), then a
#    plain model trained on the refined corpus
# 7. all three evaluated on held-out clean text and its questions (tools/evaluate.py, lm-eval)
# 8. Rho-1 vs plain: held-out loss at every saved checkpoint against tokens trained, the tokens
#    Rho-1 needs to reach plain's final loss (curve.png), and a selection picture (selection.html)
# Environment: OUT (output dir), ITERS, PROX_SFT_ITERS (refining model), PYTHON (skip the .venv
# setup), TRAIN_ARGS (extra flags).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    bash scripts/setup.sh
    PYTHON=.venv/bin/python
fi
OUT="${OUT:-quickstart_out}"
ITERS="${ITERS:-200}"
SAMPLE=examples/sample_data
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# megatron-core warns about every missing optional GPU library on CPU; the log stays readable.
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

# Hold out the last 100 clean documents for the final evaluation.
head -n -100 "$SAMPLE/clean.jsonl" > "$OUT/clean_train.jsonl"
tail -n 100 "$SAMPLE/clean.jsonl" > "$OUT/clean_heldout.jsonl"

echo "== 1. compact tokenizer: train large, count, prune (RethinkTinyLM)"
"$PYTHON" tools/train_tokenizer.py --input "$SAMPLE/clean.jsonl" --model-prefix "$OUT/tok_big" \
    --vocab-size 1000
"$PYTHON" tools/preprocess_data.py --input "$OUT/clean_train.jsonl" \
    --output-prefix "$OUT/clean_train_big" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$OUT/tok_big.model" --append-eod
"$PYTHON" tools/compact_tokenizer.py count --data-path "$OUT/clean_train_big_text_document" \
    --tokenizer-model "$OUT/tok_big.model" --output "$OUT/counts.npy" \
    --heldout "$OUT/clean_heldout.jsonl"
"$PYTHON" tools/compact_tokenizer.py prune --tokenizer-model "$OUT/tok_big.model" \
    --counts "$OUT/counts.npy" --vocab-size 512 --output "$OUT/tok.model" \
    --heldout "$OUT/clean_heldout.jsonl"

echo "== 2. indexed datasets (re-tokenized with the pruned tokenizer)"
for name in clean_train noisy; do
    src="$OUT/$name.jsonl"; [[ $name == noisy ]] && src="$SAMPLE/noisy.jsonl"
    "$PYTHON" tools/preprocess_data.py --input "$src" --output-prefix "$OUT/$name" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tok.model" --append-eod
done

COMMON=(
    --model-preset tiny --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tok.model"
    --seq-length 128 --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 --log-interval 50 --eval-interval 0
    --split 100,0,0 --device cpu ${TRAIN_ARGS:-}
)
run_train() { "$PYTHON" -m megatron_slm.pretrain "${COMMON[@]}" "$@"; }

echo "== 3. reference model on clean text"
rm -rf "$OUT/ref" "$OUT/slm" "$OUT/plain"
run_train --data-path "$OUT/clean_train_text_document" --save "$OUT/ref"

echo "== 4. score the noisy corpus offline (reference-loss sidecar)"
"$PYTHON" tools/score_corpus.py --data-prefix "$OUT/noisy_text_document" --load "$OUT/ref" \
    --seq-length 128 --micro-batch-size 8 --overwrite
"$PYTHON" tools/inspect_sidecar.py --data-path "$OUT/noisy_text_document" --top 1 --bottom 1 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tok.model" --max-chars 160

echo "== 5a. Rho-1: selective training on the noisy corpus (top 60% by excess loss)"
# Checkpoints every quarter of the run feed the learning curve of step 8.
CURVE_ARGS=(--save-interval "$(( ITERS / 4 > 0 ? ITERS / 4 : 1 ))")
run_train --data-path "$OUT/noisy_text_document" --slm-ratio 0.6 --save "$OUT/slm" \
    --tensorboard-dir "$OUT/tensorboard/slm" --log-selection-interval 50 "${CURVE_ARGS[@]}"
echo "== 5b. baseline: plain causal LM on the noisy corpus"
run_train --data-path "$OUT/noisy_text_document" --save "$OUT/plain" \
    --tensorboard-dir "$OUT/tensorboard/plain" "${CURVE_ARGS[@]}"

echo "== 6. ProX: train a refining model, refine the noisy corpus with it, train on the result"
# 6a. Seeds: a rule-based labeller (examples/sample_data/make_prox_programs.py, its programs in
# noisy_programs.jsonl) stands in for the teacher LLM of `prox_annotate.py --teacher URL`. Chunk
# seeds from the first 1200 documents, document seeds from the first 400; the last 400 held out.
rm -rf "$OUT/prox_refined" "$OUT/prox" "$OUT/refiner" "$OUT/refiner_hf" "$OUT"/prox_seeds_*
head -n 1200 "$SAMPLE/noisy.jsonl" > "$OUT/prox_docs_train.jsonl"
tail -n +1201 "$SAMPLE/noisy.jsonl" > "$OUT/prox_docs_heldout.jsonl"
# What the refining model sees must fit its 512-token sequences: chunks of at most 320 tokens of
# numbered lines, documents cut at 448 prompt tokens; prox_refine.py below uses the same limits.
LIMITS=(--chunk-max-tokens 320 --doc-max-prompt-tokens 448)
annotate() {  # split, stage, documents
    "$PYTHON" tools/prox_annotate.py --input "$3" --stage "$2" --programs "$SAMPLE/noisy_programs.jsonl" \
        --tokenizer "$OUT/tok.model" "${LIMITS[@]}" --output "$OUT/prox_seeds_$1_$2.jsonl"
}
head -n 400 "$OUT/prox_docs_train.jsonl" > "$OUT/prox_docs_train_doc.jsonl"
annotate train doc "$OUT/prox_docs_train_doc.jsonl"
annotate train chunk "$OUT/prox_docs_train.jsonl"
annotate heldout doc "$OUT/prox_docs_heldout.jsonl"
annotate heldout chunk "$OUT/prox_docs_heldout.jsonl"
cat "$OUT"/prox_seeds_heldout_{doc,chunk}.jsonl > "$OUT/prox_seeds_heldout.jsonl"
# 6b. SFT of a 2-layer refining model on the seeds (loss on the programs only), HF export.
"$PYTHON" -m megatron_slm.pretrain --sft-data "$OUT"/prox_seeds_train_{doc,chunk}.jsonl \
    --model-preset tiny --num-layers 2 --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$OUT/tok.model" --seq-length 512 --max-position-embeddings 512 \
    --micro-batch-size 8 --global-batch-size 8 --train-iters "${PROX_SFT_ITERS:-800}" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --log-interval 100 --eval-interval 0 \
    --device cpu --save "$OUT/refiner" ${TRAIN_ARGS:-}
"$PYTHON" tools/convert_checkpoint.py megatron-to-hf --load "$OUT/refiner" --save "$OUT/refiner_hf"
GEN=(--device cpu --doc-max-new-tokens 16 --chunk-max-new-tokens 160)
"$PYTHON" tools/prox_eval.py --model "$OUT/refiner_hf" --data "$OUT/prox_seeds_heldout.jsonl" \
    "${GEN[@]}" --output "$OUT/prox_eval.json" --predictions "$OUT/prox_predictions.jsonl"
# 6c. The whole noisy corpus refined by the model (tools/prox_refine.py apply would run the
# labeller's programs directly), then a plain model trained on what is left.
"$PYTHON" tools/prox_refine.py --input "$SAMPLE/noisy.jsonl" --output-dir "$OUT/prox_refined" \
    --stage doc,chunk --doc-model "$OUT/refiner_hf" --chunk-model "$OUT/refiner_hf" \
    "${LIMITS[@]}" "${GEN[@]}"
"$PYTHON" tools/preprocess_data.py --input "$OUT/prox_refined/noisy.jsonl" \
    --output-prefix "$OUT/prox_refined" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$OUT/tok.model" --append-eod
run_train --data-path "$OUT/prox_refined_text_document" --save "$OUT/prox" \
    --tensorboard-dir "$OUT/tensorboard/prox"

echo "== 7. held-out clean text: perplexity, and its questions as the lm-eval task qa_local"
"$PYTHON" - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
with open(f"{out}/clean_heldout.jsonl") as src, open(f"{out}/qa_heldout.jsonl", "w") as dst:
    for line in src:
        for q, a in re.findall(r"Question: (.*?\?) Answer: (.*?\.)", json.loads(line)["text"]):
            dst.write(json.dumps({"question": q, "answer": a}) + "\n")
PY
for run in plain slm prox; do
    "$PYTHON" tools/evaluate.py --load "$OUT/$run" --perplexity-data "clean=$OUT/clean_heldout.jsonl" \
        --seq-length 128 --append-eod --output "$OUT/eval_$run.json" \
        --lm-eval-tasks qa_local --lm-eval-metadata "{\"qa_path\": \"$OUT/qa_heldout.jsonl\"}" \
        --limit 100 --micro-batch-size 16
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def loss(run):
    report = json.load(open(f"{out}/eval_{run}.json"))
    return report["perplexity"][0]["mean_loss"]
plain, slm, prox = loss("plain"), loss("slm"), loss("prox")
print(f"held-out clean loss: plain {plain:.4f}  |  Rho-1 (60% tokens) {slm:.4f}  "
      f"({'better' if slm < plain else 'worse'} by {abs(plain - slm):.4f})  |  "
      f"ProX-refined corpus {prox:.4f} ({'better' if prox < plain else 'worse'} by "
      f"{abs(plain - prox):.4f})")
em = {r: json.load(open(f"{out}/eval_{r}.json"))["lm_eval"]["qa_local"]["exact_match,none"]
      for r in ("plain", "slm", "prox")}
print("held-out questions, exact match (qa_local): " + "  |  ".join(f"{r} {v:.2f}" for r, v in em.items()))
PY

echo "== 8. the claim: held-out loss against tokens trained, and what Rho-1 selects"
"$PYTHON" tools/learning_curve.py --runs plain="$OUT/plain" rho1="$OUT/slm" \
    --data "$OUT/clean_heldout.jsonl" --append-eod --seq-length 128 --output "$OUT/curve"
"$PYTHON" tools/visualize_selection.py --load "$OUT/slm" --data-path "$OUT/noisy_text_document" \
    --sample 3 --ratio 0.6 --max-tokens 160 --output "$OUT/selection.html"
