# The body of the SLM pretraining launch scripts (sourced after they set their defaults).
# Flags are grouped by concern in bash arrays; every value comes from the environment.
: "${RUN_DIR:?}" "${MODEL_PRESET:?}" "${TP:?}" "${PP:?}" "${SEQ_LENGTH:?}" "${GLOBAL_BATCH_SIZE:?}"
: "${LR:?}" "${MIN_LR:?}" "${TOKENIZER_MODEL:?}" "${DATA_PATH:?}"
source "$REPO_DIR/examples/_launch_common.sh"
cd "$REPO_DIR"

TRAIN_LENGTH=(--train-tokens "${TRAIN_TOKENS:-}")
[[ -n "${TRAIN_ITERS:-}" ]] && TRAIN_LENGTH=(--train-iters "$TRAIN_ITERS")
WARMUP=(--lr-warmup-iters "${LR_WARMUP_ITERS:-100}")
# TRAIN_SAMPLES: Megatron-LM's sample-based length (the warmup in samples too, LR_WARMUP_SAMPLES),
# which RAMPUP_BATCH_SIZE="START INCREMENT SAMPLES" (the batch-size ramp-up) needs.
if [[ -n "${TRAIN_SAMPLES:-}" ]]; then
    TRAIN_LENGTH=(--train-samples "$TRAIN_SAMPLES")
    WARMUP=(--lr-warmup-samples "${LR_WARMUP_SAMPLES:-$((100 * GLOBAL_BATCH_SIZE))}")
fi
[[ -n "${RAMPUP_BATCH_SIZE:-}" ]] && TRAIN_LENGTH+=(--rampup-batch-size $RAMPUP_BATCH_SIZE)
# STEP_BATCH_SIZE_SCHEDULE="0:256 50B:512 100B:1024": the global batch by tokens consumed
# (Megatron-LM's step schedule; its last size is GLOBAL_BATCH_SIZE).
[[ -n "${STEP_BATCH_SIZE_SCHEDULE:-}" ]] &&
    TRAIN_LENGTH+=(--step-batch-size-schedule "$STEP_BATCH_SIZE_SCHEDULE")

MODEL_ARGS=(--model-preset "${MODEL_PRESET}")
# Unset: Transformer Engine on GPU when installed, megatron-core local modules otherwise.
[[ -n "${TRANSFORMER_IMPL:-}" ]] && MODEL_ARGS+=(--transformer-impl "$TRANSFORMER_IMPL")
[[ -n "${NUM_LAYERS:-}" ]] && MODEL_ARGS+=(--num-layers "$NUM_LAYERS")
# OPTIMIZER=muon: Muon on the layers' matrices and AdamW on the rest (--optimizer muon), at
# AdamW's update size (MUON_EXTRA_SCALE_FACTOR, default 0.2: Moonlight's recipe); the plain
# optimizer then (Muon's matrices are not cut into the distributed optimizer's buckets).
OPTIMIZER_ARGS=()
if [[ "${OPTIMIZER:-adam}" == muon ]]; then
    : "${DISTRIBUTED_OPTIMIZER:=0}"
    OPTIMIZER_ARGS=(--optimizer muon --muon-extra-scale-factor "${MUON_EXTRA_SCALE_FACTOR:-0.2}")
fi
PARALLEL_ARGS=(
    --tensor-model-parallel-size "${TP}"
    --pipeline-model-parallel-size "${PP}"
)
[[ "${SEQUENCE_PARALLEL:-1}" == 1 && "${TP}" -gt 1 ]] && PARALLEL_ARGS+=(--sequence-parallel)
[[ "${DISTRIBUTED_OPTIMIZER:-1}" == 1 ]] && PARALLEL_ARGS+=(--use-distributed-optimizer)
# Data-parallel gradient reduction (and, with the distributed optimizer, the parameter
# all-gather) overlapped with the backward (forward), bucket by bucket: Megatron-LM's setting at
# scale. The distributed optimizer's checkpoints resume with the same setting (its buckets).
if [[ "${OVERLAP_COMM:-1}" == 1 ]]; then
    PARALLEL_ARGS+=(--overlap-grad-reduce)
    [[ "${DISTRIBUTED_OPTIMIZER:-1}" == 1 ]] && PARALLEL_ARGS+=(--overlap-param-gather)
fi
# The distributed optimizer's state per parameter in checkpoints: resumable at any TP/PP.
[[ "${FULLY_RESHARDABLE:-0}" == 1 && "${DISTRIBUTED_OPTIMIZER:-1}" == 1 ]] &&
    PARALLEL_ARGS+=(--dist-ckpt-optim-fully-reshardable)
TRAINING_ARGS=(
    --seq-length "${SEQ_LENGTH}"
    --micro-batch-size "${MICRO_BATCH_SIZE:-1}"
    --global-batch-size "${GLOBAL_BATCH_SIZE}"
    "${TRAIN_LENGTH[@]}"
    --lr "${LR}" --min-lr "${MIN_LR}"
    "${WARMUP[@]}" --lr-decay-style "${LR_DECAY_STYLE:-cosine}"
    --weight-decay "${WEIGHT_DECAY:-0.1}" --clip-grad "${CLIP_GRAD:-1.0}"
    --seed "${SEED:-1234}" --device "${DEVICE:-cuda}"
    "${OPTIMIZER_ARGS[@]}"
)
# ITERATIONS_TO_SKIP="1200 1201": those iterations' batches are dropped (past a loss spike).
[[ -n "${ITERATIONS_TO_SKIP:-}" ]] && TRAINING_ARGS+=(--iterations-to-skip $ITERATIONS_TO_SKIP)
[[ "${PRECISION:-bf16}" == bf16 ]] && TRAINING_ARGS+=(--bf16)
# RECOMPUTE=selective: each layer's core attention is recomputed in backward (Megatron-LM's
# --recompute-activations); RECOMPUTE=full (or 1): every layer, from its input (least memory).
case "${RECOMPUTE:-}" in
    "") ;;
    1 | full) TRAINING_ARGS+=(--recompute-granularity full) ;;
    *) TRAINING_ARGS+=(--recompute-granularity "$RECOMPUTE") ;;
esac
# VALID_DATA_PATH: validate on a corpus of its own (e.g. held-out high-quality data) instead of
# a --split share of DATA_PATH; DOCUMENT_MASK=1: each packed document attends only to itself.
if [[ -n "${VALID_DATA_PATH:-}" ]]; then
    DATA_ARGS=(--train-data-path ${DATA_PATH} --valid-data-path ${VALID_DATA_PATH})
else
    DATA_ARGS=(--data-path ${DATA_PATH} --split "${SPLIT:-998,2,0}")
fi
[[ "${DOCUMENT_MASK:-0}" == 1 ]] && DATA_ARGS+=(--reset-attention-mask --eod-mask-loss)
# VOCAB_FILE + MERGE_FILE: Megatron-LM's GPT2BPETokenizer files, in place of TOKENIZER_MODEL.
if [[ -n "${VOCAB_FILE:-}" ]]; then
    DATA_ARGS+=(
        --tokenizer-type GPT2BPETokenizer
        --vocab-file "$VOCAB_FILE" --merge-file "${MERGE_FILE:?VOCAB_FILE needs MERGE_FILE}"
    )
else
    DATA_ARGS+=(
        --tokenizer-type "${TOKENIZER_TYPE:-SentencePieceTokenizer}"
        --tokenizer-model "${TOKENIZER_MODEL}"
    )
fi
DATA_ARGS+=(--data-cache-path "${DATA_CACHE_PATH:-$RUN_DIR/cache}")
[[ -n "${VOCAB_SIZE:-}" ]] && DATA_ARGS+=(--vocab-size "$VOCAB_SIZE")
SLM_ARGS=()
[[ -n "${SLM_RATIO:-}" ]] && SLM_ARGS+=(
    --slm-ratio "${SLM_RATIO}"
    --slm-ref-source "${SLM_REF_SOURCE:-sidecar}"
    --slm-select-scope "${SLM_SELECT_SCOPE:-microbatch}"
    --slm-select-mode "${SLM_SELECT_MODE:-excess}"
    --slm-unscored "${SLM_UNSCORED:-keep}"
)
[[ -n "${SLM_REF_LOAD:-}" ]] && SLM_ARGS+=(--slm-ref-load "$SLM_REF_LOAD")
CHECKPOINT_ARGS=(
    --save "${SAVE:-$RUN_DIR/checkpoints}"
    --save-interval "${SAVE_INTERVAL:-500}"
    --exit-signal-handler --exit-signal SIGTERM
)
# SAVE_RETAIN_INTERVAL: keep only the checkpoints of its multiples (and the latest).
[[ -n "${SAVE_RETAIN_INTERVAL:-}" ]] && CHECKPOINT_ARGS+=(--save-retain-interval "$SAVE_RETAIN_INTERVAL")
# NON_PERSISTENT_SAVE_INTERVAL: frequent restart points in NON_PERSISTENT_DIR (default
# checkpoints/non_persistent), only the newest kept; a requeued job resumes from the newer.
NON_PERSISTENT_DIR=${NON_PERSISTENT_DIR:-${SAVE:-$RUN_DIR/checkpoints}/non_persistent}
if [[ -n "${NON_PERSISTENT_SAVE_INTERVAL:-}" ]]; then
    CHECKPOINT_ARGS+=(--non-persistent-save-interval "$NON_PERSISTENT_SAVE_INTERVAL"
        --non-persistent-global-ckpt-dir "$NON_PERSISTENT_DIR")
fi
# Resume from our own checkpoints when they exist (requeued jobs), else start from LOAD.
if [[ -f "${SAVE:-$RUN_DIR/checkpoints}/latest_checkpointed_iteration.txt" ]] ||
    [[ -n "${NON_PERSISTENT_SAVE_INTERVAL:-}" && -f "$NON_PERSISTENT_DIR/latest_checkpointed_iteration.txt" ]]; then
    CHECKPOINT_ARGS+=(--load "${SAVE:-$RUN_DIR/checkpoints}")
elif [[ -n "${LOAD:-}" ]]; then
    CHECKPOINT_ARGS+=(--load "$LOAD" --finetune)
fi
[[ -n "${EXIT_DURATION_IN_MINS:-}" ]] && CHECKPOINT_ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_IN_MINS")
LOGGING_ARGS=(
    --log-interval "${LOG_INTERVAL:-10}"
    --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-10}"
    --tensorboard-dir "${TENSORBOARD_DIR:-$RUN_DIR/tensorboard}"
)
[[ -n "${LOG_LOSS_FILE:-}" ]] && LOGGING_ARGS+=(--log-loss-file "$LOG_LOSS_FILE")
# LOG_PROGRESS=1: Megatron-LM's progress.txt in the checkpoint directory (throughput per job).
[[ "${LOG_PROGRESS:-0}" == 1 ]] && LOGGING_ARGS+=(--log-progress)

mkdir -p "$RUN_DIR"
launch_pretrain "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${SLM_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" ${EXTRA_ARGS:-}
