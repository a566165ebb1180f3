#!/bin/bash
# The reference model of Rho-1: plain causal-LM training of the base model on the small
# high-quality corpus (no selection). Its checkpoint then scores the big corpus
# (examples/score_corpus.sh) or serves as --slm-ref-load for online selection.
#
#   sbatch examples/train_reference.sh                   # 1 node x 8 GPUs
#   CONTAINER_IMAGE=/shared/megatron-slm.sqsh sbatch examples/train_reference.sh
#
# Every value is an environment variable, so the same script runs a tiny model on CPU:
#   MODEL_PRESET=tiny DEVICE=cpu TP=1 PP=1 SEQ_LENGTH=64 ... sbatch --ntasks 2 examples/...
#
#SBATCH --job-name=reference
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --output=reference-%j.out
set -euo pipefail
# sbatch runs a copy of this script: find the checkout from the submit directory (the repo root).
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"

# Defaults (override any from the environment). SLM_RATIO empty: plain training.
: "${RUN_DIR:=runs/reference}"
: "${MODEL_PRESET:=tinyllama-1.1b}" "${TP:=1}" "${PP:=1}" "${SEQ_LENGTH:=2048}"
: "${GLOBAL_BATCH_SIZE:=512}" "${TRAIN_TOKENS:=500000000}" "${LR:=5e-5}" "${MIN_LR:=5e-6}"
: "${SLM_RATIO:=}" "${TOKENIZER_MODEL:=tokenizers/llama/tokenizer.model}"
: "${DATA_PATH:=data/reference_hq_text_document}" "${LOAD=checkpoints/tinyllama-1.1b}"
source "$REPO_DIR/examples/_slm_job.sh"
