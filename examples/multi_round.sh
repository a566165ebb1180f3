#!/bin/bash
# Multiple-round training (RethinkTinyLM): round 1 -> score every batch with the round-1 model ->
# draw KEEP of the batches with p = softmax(loss / T) -> round 2 on the drawn batches.
#
#   sbatch examples/multi_round.sh                     # 4 nodes x 8 GPUs, PanGu-pi-1B-Pro-like
#
# Every value is an environment variable, so the same script runs a tiny model on CPU:
#   MODEL_PRESET=tiny DEVICE=cpu PRECISION=fp32 TP=1 PP=1 SEQ_LENGTH=64 GLOBAL_BATCH_SIZE=8 \
#   ROUND1_ITERS=20 TOKENIZER_TYPE=NullTokenizer VOCAB_SIZE=512 ... sbatch --ntasks 2 examples/...
# Without SLURM (no SLURM_JOB_ID) it runs on this machine (torchrun / python).
#
# Each stage skips or resumes what is already done, so the job is safe to requeue: training
# resumes from its checkpoints, score_batches from its written ranges (byte-identical result),
# and an existing batch list is kept. Round 2 starts from round 1's weights (--finetune) and
# trains exactly the drawn batches, in the drawn order (--train-samples-from).
#
#SBATCH --job-name=multi-round
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=96:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --output=multi-round-%j.out
set -euo pipefail
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"

# --- the run (override any from the environment) -------------------------------------------
: "${RUN_DIR:=runs/multi-round}"
: "${MODEL_PRESET:=pangu-pi-1b-pro}" "${TP:=1}" "${PP:=1}" "${SEQ_LENGTH:=2048}"
# 1024 x 2048 = 2M tokens per batch; 75,000 batches = 150B tokens (one round of the paper)
: "${GLOBAL_BATCH_SIZE:=1024}" "${ROUND1_ITERS:=75000}" "${LR:=2e-4}" "${MIN_LR:=2e-5}"
: "${TOKENIZER_MODEL:=tokenizers/compact/small.model}" "${DATA_PATH:=data/corpus_text_document}"
: "${SPLIT:=998,2,0}" "${SEED:=1234}" "${PYTHON:=python}"
# --- scoring and resampling --------------------------------------------------------------------
: "${SCORE_MICRO_BATCH_SIZE:=8}" "${SCORE_COMMIT_INTERVAL:=16}" "${SCORE_BF16:=1}"
: "${KEEP:=0.5}" "${TEMPERATURE:=1.0}" "${RESAMPLE_SEED:=$SEED}"
export SLM_RATIO="${SLM_RATIO:-}"   # plain LM by default; set for selective rounds

ROUND1_DIR="$RUN_DIR/round1"
ROUND2_DIR="$RUN_DIR/round2"
LOSSES="$RUN_DIR/round1_batch_losses"
BATCH_LIST="$RUN_DIR/round2.idx"
mkdir -p "$RUN_DIR"
export REPO_DIR MODEL_PRESET TP PP SEQ_LENGTH GLOBAL_BATCH_SIZE LR MIN_LR TOKENIZER_MODEL DATA_PATH
export SPLIT SEED PYTHON
# The sampling flags that fix the sample order: identical for training, scoring and round 2.
SAMPLING_ARGS=(
    --data-path ${DATA_PATH} --split "$SPLIT" --seq-length "$SEQ_LENGTH" --seed "$SEED"
    --global-batch-size "$GLOBAL_BATCH_SIZE"
)

# --- round 1 -----------------------------------------------------------------------------------
echo "== round 1: $ROUND1_ITERS batches"
(RUN_DIR="$ROUND1_DIR" TRAIN_ITERS="$ROUND1_ITERS" SAVE="$ROUND1_DIR/checkpoints" \
    source "$REPO_DIR/examples/_slm_job.sh")

# --- score every batch of round 1's order with the round-1 model -----------------------------
if [[ ! -f "$LOSSES.json" ]]; then
    echo "== scoring the batches of round 1 -> $LOSSES.json"
    SCORE_ARGS=(
        "${SAMPLING_ARGS[@]}" --train-iters "$ROUND1_ITERS"
        --data-cache-path "${DATA_CACHE_PATH:-$ROUND1_DIR/cache}"
        --load "$ROUND1_DIR/checkpoints" --output "$LOSSES"
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
        --micro-batch-size "$SCORE_MICRO_BATCH_SIZE" --commit-interval "$SCORE_COMMIT_INTERVAL"
        --device "${DEVICE:-cuda}"
    )
    [[ "$SCORE_BF16" == 1 && "${DEVICE:-cuda}" != cpu ]] && SCORE_ARGS+=(--bf16)
    # Scored as round 1 trained: DOCUMENT_MASK=1 gave it --reset-attention-mask --eod-mask-loss.
    [[ "${DOCUMENT_MASK:-0}" == 1 ]] && SCORE_ARGS+=(--reset-attention-mask --eod-mask-loss)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
        export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
        srun --kill-on-bad-exit=1 "$PYTHON" "$REPO_DIR/tools/score_batches.py" "${SCORE_ARGS[@]}"
    else
        "$PYTHON" -m torch.distributed.run --nproc-per-node "${NPROC_PER_NODE:-1}" \
            "$REPO_DIR/tools/score_batches.py" "${SCORE_ARGS[@]}"
    fi
fi

# --- draw round 2's batches --------------------------------------------------------------------
if [[ ! -f "$BATCH_LIST" ]]; then
    echo "== resampling: keep $KEEP, temperature $TEMPERATURE"
    "$PYTHON" "$REPO_DIR/tools/resample_batches.py" --losses "$LOSSES" --keep "$KEEP" \
        --temperature "$TEMPERATURE" --seed "$RESAMPLE_SEED" --output "$BATCH_LIST"
fi
ROUND2_ITERS=$("$PYTHON" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["batches"]))' \
    "$BATCH_LIST")

# --- round 2: the drawn batches, from round 1's weights ----------------------------------------
echo "== round 2: $ROUND2_ITERS batches from $BATCH_LIST"
(RUN_DIR="$ROUND2_DIR" TRAIN_ITERS="$ROUND2_ITERS" SAVE="$ROUND2_DIR/checkpoints" \
    LOAD="$ROUND1_DIR/checkpoints" DATA_CACHE_PATH="${DATA_CACHE_PATH:-$ROUND1_DIR/cache}" \
    EXTRA_ARGS="--train-samples-from $BATCH_LIST ${EXTRA_ARGS:-}" \
    source "$REPO_DIR/examples/_slm_job.sh")
