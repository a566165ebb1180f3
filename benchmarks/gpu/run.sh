#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call (issue 26 item 6): <= 8 minutes on one H200.
#
#   OUT=/path/to/out bash benchmarks/gpu/run.sh
#
# Steps, in this order, each under its own `timeout` (capped by what is left of GPU_RUN_TOTAL_S);
# a failed or timed-out step does not stop the next ones:
#   wheels   pip install .whl/*.whl: megatron-core, liger-kernel (the GPU machine has no network;
#            .whl/ is git-ignored, filled with `pip download`, see README.md "GPU")
#   env      the header of RESULTS_gpu.md: date, commit, device, driver, versions
#   build    megatron_slm._C with its CUDA kernels (setup.py build_ext --inplace)
#   checks   three at once, all small: pytest tests/gpu (the op's calls, training steps and
#            scorer rounds under torch.cuda.set_sync_debug_mode("error")), compute-sanitizer
#            memcheck and racecheck on benchmarks/gpu/sanitizer_workload.py (our kernels only:
#            --kernel-name kns=megatron_slm)
#   op       benchmarks/gpu/op_table.py: torch, megatron-core (+ fused), Liger, ours vs the bound
#   train    $TRAIN_CMD: training step, plain / sidecar / online reference (FlexAttention and
#            dense-mask document attention) / distillation / one MTP head, MFU
#   score    $SCORE_CMD: scorer tokens/s against a training step's, length-sorted rows and packed
#            rows (FlexAttention) side by side (SCORE_CMD="" leaves it out)
#   swiglu   benchmarks/bench_swiglu.py: the fused SwiGLU against megatron-core's unfused one, one
#            tinyllama MLP activation, fwd+bwd (diagnostic)
#   rope     benchmarks/bench_rope.py: the fused RoPE against megatron-core's unfused one, one
#            tinyllama layer's query and key, fwd+bwd (diagnostic)
#   sdpa     benchmarks/gpu/sdpa_shapes.py: forward-only attention at many widths, SDPA's default
#            order (cuDNN first on sm90: a graph build per shape) against the torch spec's
#            choice in eval mode (no cuDNN) (diagnostic)
#   profile  benchmarks/gpu/profile_op.py: the kernels of one call of ours at [4096, 2, 32000]
#            (diagnostic)
#   muon     benchmarks/bench_muon.py: one optimizer step of 4 tinyllama layers, AdamW against
#            Muon at each Newton-Schulz precision (last: diagnostic only)
#
# Written into $OUT as it goes (at most 8 files come back from the GPU machine):
#   log.txt           everything, stdout and stderr of every step
#   RESULTS_gpu.md    built section by section; copy it to benchmarks/RESULTS_gpu.md after the run
#   profile.txt       the profile tables;  memcheck.txt, racecheck.txt: full sanitizer reports
#
# Environment (all optional):
#   OUT               output folder (default /tmp/megatron_slm_gpu_out)
#   PYTHON            interpreter (default python3)
#   GPU_RUN_TOTAL_S   wall-clock budget of the whole run, seconds (default 470)
#   T_WHEELS T_ENV T_BUILD T_CHECKS T_OP T_TRAIN T_SCORE T_SWIGLU T_ROPE T_SDPA T_PROFILE T_MUON
#                     timeouts, s
#   TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: the CPU count)
#   COMPUTE_SANITIZER path of compute-sanitizer (default: on PATH, else /usr/local/cuda/bin)
#   SKIP_STEPS        steps to leave out, e.g. "racecheck profile train" (a short lease)
#   GPU_TESTS         what pytest runs in the tests step (default tests/gpu)
#   OP_ARGS PROFILE_ARGS  extra arguments of op_table.py / profile_op.py (e.g. --shapes ...)
#   TRAIN_CMD SCORE_CMD   the training-step and scorer benchmarks (split on spaces)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-/tmp/megatron_slm_gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL_S=${GPU_RUN_TOTAL_S:-470}
LOG=$OUT/log.txt
RES=$OUT/RESULTS_gpu.md
WORK=$(mktemp -d)
SITE=$WORK/site # fallback install target when pip cannot write into the environment
NCPU=$(nproc 2>/dev/null || echo 8)
SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
TRAIN_CMD=${TRAIN_CMD:-"$PY benchmarks/bench_train_step.py --device cuda --model-preset tinyllama-1.1b --num-layers 8 --seq-length 2048 --micro-batch-size 4 --global-batch-size 8 --bf16 --iters 15 --warmup 5 --rounds 1"}
# The training-step benchmark also runs tools/score_corpus.py on its model: scorer tok/s vs
# training is in its output; SCORE_CMD compares the scorer's two packings against its own anchor.
# Both score several of the tool's 1000-document chunks: the first chunk is packed before any
# forward, so a one-chunk corpus times that packing too (cpu: 400 documents, one chunk, 2.35x
# training; 1200 documents, two chunks, 3.32x).
SCORE_CMD=${SCORE_CMD-"$PY benchmarks/bench_score_corpus.py --device cuda --model-preset tinyllama-1.1b --num-layers 8 --seq-length 2048 --micro-batch-size 4 --bf16 --docs 3000 --warmup-docs 1000 --repeat 1 --packing auto rows"}
read -ra TRAIN <<<"$TRAIN_CMD"
read -ra SCORE <<<"$SCORE_CMD"
read -ra OP_EXTRA <<<"${OP_ARGS:-}"
read -ra PROFILE_EXTRA <<<"${PROFILE_ARGS:-}"
export PY WORK SITE REPO NCPU PYTHONUNBUFFERED=1 PYTHONPATH=$REPO
T0=$SECONDS

# --- step machinery -------------------------------------------------------------------------
# run_step NAME BUDGET_S CMD...: CMD under `timeout` (BUDGET_S, or what is left of the total),
# stdout to $WORK/NAME.out (and the log, live, unless QUIET=1), stderr to $WORK/NAME.err (into
# the log when the step ends); NAME.status and NAME.sec record how it went.
run_step() {
    local name=$1 budget=$2 left
    shift 2
    left=$((TOTAL_S - (SECONDS - T0)))
    ((budget > left)) && budget=$left
    : >"$WORK/$name.out"
    : >"$WORK/$name.err"
    echo "$budget" >"$WORK/$name.budget"
    if [[ " ${SKIP_STEPS:-} " == *" $name "* ]]; then
        echo "skipped: SKIP_STEPS" >"$WORK/$name.status"
        echo 0 >"$WORK/$name.sec"
        echo "=== $name: skipped (SKIP_STEPS)"
        return 0
    fi
    if ((budget < 10)); then
        echo "skipped: out of time" >"$WORK/$name.status"
        echo 0 >"$WORK/$name.sec"
        echo "=== $name: skipped, ${left}s left of ${TOTAL_S}s"
        return 1
    fi
    echo "=== $name (timeout ${budget}s): $*"
    local start=$SECONDS rc
    if [[ ${QUIET:-0} == 1 ]]; then
        timeout -k 10 "$budget" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
        rc=$?
    else
        timeout -k 10 "$budget" "$@" 2>"$WORK/$name.err" | tee "$WORK/$name.out"
        rc=${PIPESTATUS[0]}
    fi
    echo $((SECONDS - start)) >"$WORK/$name.sec"
    case $rc in
    0) echo ok ;;
    124 | 137) echo "timed out after ${budget}s" ;;
    *) echo "failed (exit $rc)" ;;
    esac >"$WORK/$name.status"
    if [[ ${QUIET:-0} != 1 ]]; then
        cat "$WORK/$name.err"
        echo "=== $name: $(cat "$WORK/$name.status") in $(cat "$WORK/$name.sec")s"
    fi
    return "$rc"
}

status_of() { cat "$WORK/$1.status" 2>/dev/null || echo "not run"; }

# section TITLE STEP...: appends "## TITLE", each step's status, then stdin, then the stderr tail
# of every step that did not succeed.
section() {
    local title=$1 s
    shift
    {
        printf '\n## %s\n\n' "$title"
        for s in "$@"; do echo "Step \`$s\`: $(status_of "$s"), $(cat "$WORK/$s.sec" 2>/dev/null || echo 0) s."; done
        (($#)) && echo
        cat
        for s in "$@"; do
            if [[ $(status_of "$s") != ok && -s $WORK/$s.err ]]; then
                # shellcheck disable=SC2016 # backquotes are markdown here
                printf '\n`%s`, last lines of stderr:\n\n```text\n' "$s"
                tail -n 25 "$WORK/$s.err"
                printf '```\n'
            fi
        done
    } >>"$RES"
}

# --- the steps that are shell functions (run through `bash -c` under timeout) ---------------
# shellcheck disable=SC2329 # invoked through bash -c (export -f)
install_wheels() {
    shopt -s nullglob
    local whl=(.whl/*.whl)
    if ((${#whl[@]} == 0)); then
        echo "No .whl/ folder: megatron-core and liger-kernel only if the image has them."
        return 0
    fi
    local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
    if "${pip[@]}" "${whl[@]}" >&2; then
        echo "Installed into the environment: ${whl[*]##*/}."
        return 0
    fi
    echo "pip could not install into the environment; installing into $SITE" >&2
    "${pip[@]}" --target "$SITE" "${whl[@]}" >&2 || return 1
    echo "Installed into $SITE (PYTHONPATH): ${whl[*]##*/}."
}

# shellcheck disable=SC2329
build_ext() {
    # compiler output goes to stderr (the log); stdout is the section's text
    MEGATRON_SLM_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$NCPU} \
        "$PY" setup.py build_ext --inplace >&2 || return 1
    "$PY" -c 'from megatron_slm import _extension as e
print(e.extension_status() + ".")
raise SystemExit(0 if e.HAS_CUDA_KERNELS else 1)' || return 1
    # the sanitizers filter on this substring: a filter that matches no kernel checks nothing
    local so=(megatron_slm/_C*.so) n how=cuobjdump
    if command -v cuobjdump >/dev/null; then # kernel entries of the embedded cubins
        n=$(cuobjdump --dump-elf-symbols "${so[0]}" | grep STO_ENTRY | grep -c megatron_slm)
    else # the host stubs nvcc writes for each kernel
        how="nm"
        n=$(nm "${so[0]}" | grep -c '__device_stub__.*megatron_slm')
    fi
    echo "${n:-0}" >"$WORK/n_kernels"
    echo "CUDA kernels named megatron_slm in ${so[0]} ($how): ${n:-0}."
}

# shellcheck disable=SC2329
sanitize() { # sanitize TOOL: compute-sanitizer TOOL on the workload, our kernels only
    local n
    n=$(cat "$WORK/n_kernels" 2>/dev/null || echo 0)
    if ((n == 0)); then
        echo "no kernel named megatron_slm found in the build: the filter would check nothing" >&2
        return 1
    fi
    "$SAN" --tool "$1" --kernel-name kns=megatron_slm --report-api-errors no --error-exitcode 3 \
        "$PY" benchmarks/gpu/sanitizer_workload.py --device cuda
}
export -f install_wheels build_ext sanitize
export SAN

main() {
    : >"$RES"
    echo "=== benchmarks/gpu/run.sh in $REPO, OUT=$OUT, budget ${TOTAL_S}s, $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used \
        --format=csv 2>&1 || true

    run_step wheels "${T_WHEELS:-60}" bash -c install_wheels
    [[ -d $SITE ]] && export PYTHONPATH=$SITE:$REPO

    run_step env "${T_ENV:-60}" "$PY" benchmarks/gpu/env_info.py
    {
        echo "# GPU results"
        echo
        echo "Written by \`bash benchmarks/gpu/run.sh\` in one call, section by section (a section"
        echo "names its step's status). Method and targets: the docstrings of benchmarks/gpu/*.py."
        echo
        cat "$WORK/env.out"
        echo
        echo "Step \`wheels\`: $(status_of wheels). $(cat "$WORK/wheels.out")"
        if [[ $(status_of wheels) != ok ]]; then
            printf '\n```text\n'
            tail -n 10 "$WORK/wheels.err"
            printf '```\n'
        fi
    } >>"$RES"

    run_step build "${T_BUILD:-120}" bash -c build_ext
    section "Build" build <"$WORK/build.out"

    # correctness checks, small and independent: run side by side
    read -ra GPU_TESTS <<<"${GPU_TESTS:-tests/gpu}"
    # -v: a line per test as it ends, so a step cut short by its timeout still says what passed
    QUIET=1 run_step tests "${T_CHECKS:-200}" "$PY" -m pytest -v -rfEs -p no:cacheprovider \
        "${GPU_TESTS[@]}" &
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 QUIET=1 run_step memcheck "${T_CHECKS:-200}" \
        bash -c "sanitize memcheck" &
    QUIET=1 run_step racecheck "${T_CHECKS:-200}" bash -c "sanitize racecheck" &
    wait
    # on a GPU nothing in tests/gpu should skip (a skip there means: no CUDA kernels were built)
    if [[ $(status_of tests) == ok ]] && grep -qE '[0-9]+ skipped' "$WORK/tests.out"; then
        echo "ok, but some tests were skipped (listed below)" >"$WORK/tests.status"
    fi
    local s
    for s in tests memcheck racecheck; do
        echo "=== $s: $(status_of "$s") in $(cat "$WORK/$s.sec")s"
        tail -n 200 "$WORK/$s.out"
        tail -n 50 "$WORK/$s.err"
    done
    for s in memcheck racecheck; do # the sanitizer's report is on stdout, the workload's errors on stderr
        cat "$WORK/$s.out" "$WORK/$s.err" | head -c 8000000 >"$OUT/$s.txt"
    done
    {
        echo "pytest tests/gpu (the op's calls, training steps and scorer rounds under \`torch.cuda.set_sync_debug_mode(\"error\")\`):"
        echo
        echo '```text'
        grep -E '^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|skipped|error)' "$WORK/tests.out" | tail -n 40
        if ! grep -qE '[0-9]+ (passed|failed|error)' "$WORK/tests.out"; then
            echo "no summary (pytest ended early); from the per-test lines:" \
                "$(grep -c ' PASSED' "$WORK/tests.out") passed," \
                "$(grep -c ' FAILED' "$WORK/tests.out") failed"
            grep -E ' (FAILED|ERROR)' "$WORK/tests.out" | head -n 30
        fi
        echo '```'
    } | section "tests/gpu" tests
    {
        echo "compute-sanitizer on benchmarks/gpu/sanitizer_workload.py, kernels named megatron_slm"
        echo "(memcheck without PyTorch's caching allocator, so each buffer is its own allocation):"
        echo
        echo '```text'
        grep -HE 'ERROR SUMMARY|RACECHECK SUMMARY|sanitizer workload:|^FAIL' \
            "$OUT/memcheck.txt" "$OUT/racecheck.txt" | sed "s|^$OUT/||"
        echo '```'
    } | section "compute-sanitizer" memcheck racecheck

    run_step op "${T_OP:-120}" "$PY" benchmarks/gpu/op_table.py "${OP_EXTRA[@]}"
    section "Selective loss op, side by side" op <"$WORK/op.out"

    run_step train "${T_TRAIN:-200}" "${TRAIN[@]}"
    { echo "\`${TRAIN_CMD}\`"; echo; cat "$WORK/train.out"; } | section "Training step" train

    if ((${#SCORE[@]})); then
        run_step score "${T_SCORE:-120}" "${SCORE[@]}"
        { echo "\`${SCORE_CMD}\`"; echo; cat "$WORK/score.out"; } | section "Scorer" score
    fi

    # diagnostics only: last, so a short lease spends its time on the figures with targets
    run_step swiglu "${T_SWIGLU:-30}" "$PY" benchmarks/bench_swiglu.py --device cuda
    section "Fused SwiGLU" swiglu <"$WORK/swiglu.out"

    run_step rope "${T_ROPE:-30}" "$PY" benchmarks/bench_rope.py --device cuda
    section "Fused RoPE" rope <"$WORK/rope.out"

    run_step sdpa "${T_SDPA:-40}" "$PY" benchmarks/gpu/sdpa_shapes.py
    section "Forward-only attention at many widths" sdpa <"$WORK/sdpa.out"

    run_step profile "${T_PROFILE:-60}" "$PY" benchmarks/gpu/profile_op.py "${PROFILE_EXTRA[@]}"
    cp "$WORK/profile.out" "$OUT/profile.txt"
    section "Profile of one call of ours" profile <"$WORK/profile.out"

    run_step muon "${T_MUON:-40}" "$PY" benchmarks/bench_muon.py --device cuda \
        --model-preset tinyllama-1.1b --num-layers 4 --repeats 3
    section "Muon's optimizer step" muon <"$WORK/muon.out"

    {
        echo "| step | status | seconds | timeout s |"
        echo "|---|---|---:|---:|"
        for s in wheels env build tests memcheck racecheck op train score swiglu rope sdpa profile \
            muon; do
            echo "| $s | $(status_of "$s") | $(cat "$WORK/$s.sec" 2>/dev/null || echo -) |" \
                "$(cat "$WORK/$s.budget" 2>/dev/null || echo -) |"
        done
        echo
        echo "Total: $((SECONDS - T0)) s of a ${TOTAL_S} s budget."
    } | section "Steps"
    echo "=== done in $((SECONDS - T0))s: $RES"
    local failed
    failed=$(grep -lv '^ok$' "$WORK"/*.status 2>/dev/null | wc -l)
    rm -rf "$WORK"
    ((failed == 0))
}

: >"$LOG"
main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
