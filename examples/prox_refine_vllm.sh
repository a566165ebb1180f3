#!/bin/bash
# ProX refinement at scale: one `vllm serve` per node, tools/prox_refine.py --backend openai
# pointed at it. One stage per job (one server serves one model): the document stage, then the
# chunk stage on its kept output.
#
#   STAGE=doc MODEL=/hf/prox-doc INPUT='/data/raw/*.jsonl' OUTPUT_DIR=/data/doc_kept \
#       sbatch --nodes=8 examples/prox_refine_vllm.sh
#   STAGE=chunk MODEL=/hf/prox-chunk INPUT='/data/doc_kept/*.jsonl' OUTPUT_DIR=/data/refined \
#       sbatch --nodes=8 examples/prox_refine_vllm.sh
#
# Each node (one srun task) starts vLLM on its GPUs (TP GPUs per model copy, the rest as vLLM data
# parallelism), waits for /health, then refines its part of the input files (the files are split
# round-robin across nodes, and across array tasks with --array). Requests carry the prompts the
# tool renders (SEMANTICS=prox reproduces the released ProX code; add DOC_TEMPLATE=llama2 for its
# document stage). A rerun or a requeue skips finished shards and asks the server nothing twice
# (the per-shard journal); the outputs are byte-identical. Every value can be overridden from the
# environment; CONTAINER_IMAGE (pyxis/enroot squashfs with vLLM and this repository) is optional.
#
#SBATCH --job-name=prox-refine-vllm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail

# --- where things are -------------------------------------------------------------------------
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
INPUT=${INPUT:?set INPUT to JSONL files or globs (space-separated, quoted globs)}
OUTPUT_DIR=${OUTPUT_DIR:?set OUTPUT_DIR}
STAGE=${STAGE:?set STAGE to doc or chunk}
MODEL=${MODEL:?set MODEL to the refining model of the stage (Hugging Face directory)}
PYTHON=${PYTHON:-python}
VLLM=${VLLM:-vllm}

# --- the server -------------------------------------------------------------------------------
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TP=${TP:-1}                              # GPUs per model copy
PORT=${PORT:-8000}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
SERVER_WAIT=${SERVER_WAIT:-1800}         # seconds for the server to come up
VLLM_ARGS=${VLLM_ARGS:-}                 # extra `vllm serve` flags

# --- the client -------------------------------------------------------------------------------
SEMANTICS=${SEMANTICS:-strict}           # strict | prox
DOC_TEMPLATE=${DOC_TEMPLATE:-model}      # model | llama2 (ProX's document stage)
CONCURRENCY=${CONCURRENCY:-256}          # requests in flight per node
WINDOW=${WINDOW:-4096}                   # documents per generation window
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

node_task() {  # runs once per node, under srun
    local log="logs/vllm-${SLURM_JOB_ID:-0}-${SLURM_PROCID:-0}.log"
    "$VLLM" serve "$MODEL" --host 127.0.0.1 --port "$PORT" --tensor-parallel-size "$TP" \
        --data-parallel-size $((GPUS_PER_NODE / TP)) --max-model-len "$MAX_MODEL_LEN" \
        $VLLM_ARGS > "$log" 2>&1 &
    local server=$!
    trap 'kill "$server" 2>/dev/null' EXIT
    local waited=0
    until "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=5)" \
            2>/dev/null; do
        kill -0 "$server" 2>/dev/null || { echo "vllm serve exited, see $log" >&2; return 1; }
        (( waited >= SERVER_WAIT )) && { echo "vllm serve not up after ${SERVER_WAIT}s" >&2; return 1; }
        sleep 10; waited=$((waited + 10))
    done
    read -r -a INPUTS <<< "$INPUT"
    local model_flag=(--doc-model "$MODEL")
    [[ "$STAGE" == chunk ]] && model_flag=(--chunk-model "$MODEL")
    local script="$REPO_DIR/tools/prox_refine.py"
    [[ -n "$CONTAINER_IMAGE" ]] && script="$CONTAINER_WORKDIR/tools/prox_refine.py"
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
    MODEL_ARGS=(
        --stage "$STAGE"
        "${model_flag[@]}"
        --doc-template "$DOC_TEMPLATE"
        --window "$WINDOW"
        --doc-max-prompt-tokens "$DOC_MAX_PROMPT_TOKENS"
        --chunk-max-tokens "$CHUNK_MAX_TOKENS"
        --doc-max-new-tokens "$DOC_MAX_NEW_TOKENS"
        --chunk-max-new-tokens "$CHUNK_MAX_NEW_TOKENS"
    )
    SERVER_ARGS=(
        --backend openai
        --endpoint "http://127.0.0.1:$PORT/v1"
        --concurrency "$CONCURRENCY"
    )
    # the ranks (one per node) split the input files: SLURM_PROCID / SLURM_NTASKS
    "$PYTHON" "$script" "${RUN_ARGS[@]}" "${MODEL_ARGS[@]}" "${SERVER_ARGS[@]}"
}

if [[ "${1:-}" == "--node-task" ]]; then
    node_task
    exit
fi

SRUN_ARGS=(--kill-on-bad-exit=1 --ntasks-per-node=1)
SELF="$REPO_DIR/examples/prox_refine_vllm.sh"
if [[ -n "$CONTAINER_IMAGE" ]]; then
    SRUN_ARGS+=(--container-image "$CONTAINER_IMAGE" --container-workdir "$CONTAINER_WORKDIR")
    [[ -n "$CONTAINER_MOUNTS" ]] && SRUN_ARGS+=(--container-mounts "$CONTAINER_MOUNTS")
    SELF="$CONTAINER_WORKDIR/examples/prox_refine_vllm.sh"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
mkdir -p logs
srun "${SRUN_ARGS[@]}" bash "$SELF" --node-task
