#!/bin/bash
# Score a tokenized corpus with a reference model into reference-loss sidecars (Rho-1, offline).
#
#   DATA_PREFIX="/data/corpus_text_document" REF_CHECKPOINT=/ckpt/ref sbatch examples/score_corpus.sh
#
# One task per GPU; the data-parallel ranks (tasks / (TP x PP)) split the documents. Every value
# below can be overridden from the environment. Rerunning the same command after a preemption or
# a crash resumes where it stopped (the job is safe to requeue); the finished sidecar is
# byte-identical to an uninterrupted run's. CONTAINER_IMAGE (pyxis/enroot squashfs) is optional.
#
#SBATCH --job-name=score-corpus
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

# --- where things are -------------------------------------------------------------------------
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DATA_PREFIX=${DATA_PREFIX:?set DATA_PREFIX to one or more token dataset prefixes (space-separated)}
REF_CHECKPOINT=${REF_CHECKPOINT:?set REF_CHECKPOINT to the reference model checkpoint}
PYTHON=${PYTHON:-python}

# --- model and parallelism --------------------------------------------------------------------
TP=${TP:-1}
PP=${PP:-1}
MODEL_PRESET=${MODEL_PRESET:-}          # empty: the checkpoint's architecture; set: must match it
FP32=${FP32:-0}                         # 1: run in float32 (default: the checkpoint's dtype)
DEVICE=${DEVICE:-auto}                  # auto | cuda | cpu

# --- scoring ----------------------------------------------------------------------------------
SEQ_LENGTH=${SEQ_LENGTH:-2048}
STRIDE=${STRIDE:-1536}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
SIDECAR_DTYPE=${SIDECAR_DTYPE:-float16}
COMMIT_INTERVAL=${COMMIT_INTERVAL:-2000}
MAX_DOCS=${MAX_DOCS:-}                  # set for a trial on the first N documents
DRY_RUN=${DRY_RUN:-0}                   # 1: score two chunks per rank, print a time estimate
OVERWRITE=${OVERWRITE:-0}               # 1: replace an existing sidecar

# --- tokenizer (empty: recorded in the checkpoint) --------------------------------------------
TOKENIZER_TYPE=${TOKENIZER_TYPE:-}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}

# --- container (optional) ---------------------------------------------------------------------
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}
CONTAINER_WORKDIR=${CONTAINER_WORKDIR:-/opt/megatron-slm}

read -r -a DATA_PREFIXES <<< "$DATA_PREFIX"
DATA_ARGS=(--data-prefix "${DATA_PREFIXES[@]}")
MODEL_ARGS=(--load "$REF_CHECKPOINT")
[[ -n "$MODEL_PRESET" ]] && MODEL_ARGS+=(--model-preset "$MODEL_PRESET")
[[ "$FP32" == 1 ]] && MODEL_ARGS+=(--fp32)
PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --device "$DEVICE"
)
SCORING_ARGS=(
    --seq-length "$SEQ_LENGTH"
    --stride "$STRIDE"
    --micro-batch-size "$MICRO_BATCH_SIZE"
    --dtype "$SIDECAR_DTYPE"
    --commit-interval "$COMMIT_INTERVAL"
)
[[ -n "$MAX_DOCS" ]] && SCORING_ARGS+=(--max-docs "$MAX_DOCS")
[[ "$DRY_RUN" == 1 ]] && SCORING_ARGS+=(--dry-run)
[[ "$OVERWRITE" == 1 ]] && SCORING_ARGS+=(--overwrite)
TOKENIZER_ARGS=()
[[ -n "$TOKENIZER_TYPE" ]] && TOKENIZER_ARGS+=(--tokenizer-type "$TOKENIZER_TYPE")
[[ -n "$TOKENIZER_MODEL" ]] && TOKENIZER_ARGS+=(--tokenizer-model "$TOKENIZER_MODEL")

SRUN_ARGS=(--kill-on-bad-exit=1)
SCRIPT="$REPO_DIR/tools/score_corpus.py"
if [[ -n "$CONTAINER_IMAGE" ]]; then
    SRUN_ARGS+=(--container-image "$CONTAINER_IMAGE" --container-workdir "$CONTAINER_WORKDIR")
    [[ -n "$CONTAINER_MOUNTS" ]] && SRUN_ARGS+=(--container-mounts "$CONTAINER_MOUNTS")
    SCRIPT="$CONTAINER_WORKDIR/tools/score_corpus.py"
fi

# CPU threads per task: torchrun's default. Without it, each task's OpenMP pool takes every core
# of the node; on a shared CPU node that oversubscription made a tiny-model forward 30x slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p logs
# Rank/world/rendezvous come from SLURM_PROCID/SLURM_NTASKS/SLURM_JOB_NODELIST (megatron_slm.launch).
srun "${SRUN_ARGS[@]}" "$PYTHON" "$SCRIPT" \
    "${DATA_ARGS[@]}" "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${SCORING_ARGS[@]}" \
    "${TOKENIZER_ARGS[@]}"
