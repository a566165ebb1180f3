#!/bin/bash
# ProX corpus refinement (tools/prox_refine.py) under SLURM: one task per GPU, and optionally a
# job array over the input files.
#
#   INPUT='/data/raw/*.jsonl' OUTPUT_DIR=/data/refined DOC_MODEL=/hf/prox-doc \
#       CHUNK_MODEL=/hf/prox-chunk sbatch --array=0-7 examples/prox_refine.sh
#   INPUT='/data/raw/*.jsonl' OUTPUT_DIR=/data/refined PROGRAMS=/data/programs.jsonl \
#       sbatch examples/prox_refine.sh            # apply mode: execute existing programs
#
# The input files are split round-robin across array tasks (a 0-based array: --array=0-N) (--shard-index/--num-shards) and, in
# each task, across its srun tasks (SLURM_PROCID/SLURM_NTASKS; no process group is created). Each
# output shard is written atomically; rerunning the same command (or requeueing after a
# preemption) skips the finished shards and gives byte-identical outputs. Every value below can be
# overridden from the environment. CONTAINER_IMAGE (pyxis/enroot squashfs) is optional. This runs
# the transformers backend in every task; for vLLM at scale use examples/prox_refine_vllm.sh (one
# `vllm serve` per node, --backend openai).
#
#SBATCH --job-name=prox-refine
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail

# --- where things are -------------------------------------------------------------------------
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
INPUT=${INPUT:?set INPUT to JSONL files or globs (space-separated, quoted globs)}
OUTPUT_DIR=${OUTPUT_DIR:?set OUTPUT_DIR}
PYTHON=${PYTHON:-python}

# --- mode: PROGRAMS set = apply mode; otherwise the refining models write the programs --------
PROGRAMS=${PROGRAMS:-}
ID_KEY=${ID_KEY:-id}
STAGE=${STAGE:-doc,chunk}
DOC_MODEL=${DOC_MODEL:-}
CHUNK_MODEL=${CHUNK_MODEL:-}
SEMANTICS=${SEMANTICS:-strict}          # strict | prox (reproduce the released ProX code)
DEVICE=${DEVICE:-auto}                  # transformers backend: auto | cpu | cuda
DTYPE=${DTYPE:-auto}
BATCH_SIZE=${BATCH_SIZE:-32}            # transformers backend: prompts per generate call
WINDOW=${WINDOW:-1024}                  # documents generated together (the batching pool)

# --- ProX settings (the paper's defaults) -----------------------------------------------------
DOC_MAX_PROMPT_TOKENS=${DOC_MAX_PROMPT_TOKENS:-2000}
CHUNK_MAX_TOKENS=${CHUNK_MAX_TOKENS:-1500}
DOC_MAX_NEW_TOKENS=${DOC_MAX_NEW_TOKENS:-2000}
CHUNK_MAX_NEW_TOKENS=${CHUNK_MAX_NEW_TOKENS:-256}
DROP_RATIO=${DROP_RATIO:-0.05}
DROP_WORDS=${DROP_WORDS:-10}
MAX_ERRORS=${MAX_ERRORS:-2}
TEXT_KEY=${TEXT_KEY:-text}

# --- container (optional) ---------------------------------------------------------------------
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-}
CONTAINER_WORKDIR=${CONTAINER_WORKDIR:-/opt/megatron-slm}

read -r -a INPUTS <<< "$INPUT"
RUN_ARGS=(
    --input "${INPUTS[@]}"
    --output-dir "$OUTPUT_DIR"
    --text-key "$TEXT_KEY"
    --shard-index "${SLURM_ARRAY_TASK_ID:-0}"
    --num-shards "${SLURM_ARRAY_TASK_COUNT:-1}"
    --drop-ratio "$DROP_RATIO"
    --drop-words "$DROP_WORDS"
    --max-errors "$MAX_ERRORS"
    --semantics "$SEMANTICS"
)
if [[ -n "$PROGRAMS" ]]; then
    MODE_ARGS=(apply --programs "$PROGRAMS" --id-key "$ID_KEY")
else
    MODE_ARGS=(
        --stage "$STAGE"
        --backend transformers
        --device "$DEVICE"
        --dtype "$DTYPE"
        --batch-size "$BATCH_SIZE"
        --window "$WINDOW"
        --doc-max-prompt-tokens "$DOC_MAX_PROMPT_TOKENS"
        --chunk-max-tokens "$CHUNK_MAX_TOKENS"
        --doc-max-new-tokens "$DOC_MAX_NEW_TOKENS"
        --chunk-max-new-tokens "$CHUNK_MAX_NEW_TOKENS"
    )
    [[ -n "$DOC_MODEL" ]] && MODE_ARGS+=(--doc-model "$DOC_MODEL")
    [[ -n "$CHUNK_MODEL" ]] && MODE_ARGS+=(--chunk-model "$CHUNK_MODEL")
fi

SRUN_ARGS=(--kill-on-bad-exit=1)
SCRIPT="$REPO_DIR/tools/prox_refine.py"
if [[ -n "$CONTAINER_IMAGE" ]]; then
    SRUN_ARGS+=(--container-image "$CONTAINER_IMAGE" --container-workdir "$CONTAINER_WORKDIR")
    [[ -n "$CONTAINER_MOUNTS" ]] && SRUN_ARGS+=(--container-mounts "$CONTAINER_MOUNTS")
    SCRIPT="$CONTAINER_WORKDIR/tools/prox_refine.py"
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p logs
# 'apply' must come first on the tool's command line.
if [[ -n "$PROGRAMS" ]]; then
    srun "${SRUN_ARGS[@]}" "$PYTHON" "$SCRIPT" "${MODE_ARGS[@]:0:1}" "${RUN_ARGS[@]}" \
        "${MODE_ARGS[@]:1}"
else
    # one GPU per task: each task sees only its own
    srun "${SRUN_ARGS[@]}" --gpus-per-task=1 "$PYTHON" "$SCRIPT" "${RUN_ARGS[@]}" "${MODE_ARGS[@]}"
fi
