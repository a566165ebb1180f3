#!/bin/bash
# Rho-1 at 1B: TinyLlama-1.1B continual pretraining with Selective Language Modeling (top 60% of
# tokens by excess loss, reference losses from sidecars written by tools/score_corpus.py).
#
#   sbatch examples/pretrain_rho_1b.sh                   # 1 node x 8 GPUs
#   CONTAINER_IMAGE=/shared/megatron-slm.sqsh sbatch examples/pretrain_rho_1b.sh
#
# Every value is an environment variable, so the same script runs a tiny model on CPU:
#   MODEL_PRESET=tiny DEVICE=cpu TP=1 PP=1 SEQ_LENGTH=64 ... sbatch --ntasks 2 examples/...
#
#SBATCH --job-name=rho-1b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --output=rho-1b-%j.out
set -euo pipefail
# sbatch runs a copy of this script: find the checkout from the submit directory (the repo root).
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"

# Defaults (override any from the environment).
: "${RUN_DIR:=runs/rho-1b}"
: "${MODEL_PRESET:=tinyllama-1.1b}" "${TP:=1}" "${PP:=1}" "${SEQ_LENGTH:=2048}"
: "${GLOBAL_BATCH_SIZE:=1024}" "${TRAIN_TOKENS:=15000000000}" "${LR:=8e-5}" "${MIN_LR:=8e-6}"
: "${SLM_RATIO:=0.6}" "${TOKENIZER_MODEL:=tokenizers/llama/tokenizer.model}"
: "${DATA_PATH:=data/openwebmath_text_document}" "${LOAD=checkpoints/tinyllama-1.1b}"
: "${SEQUENCE_PARALLEL:=0}"
source "$REPO_DIR/examples/_slm_job.sh"
