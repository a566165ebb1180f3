# Shared by the SLURM launch scripts in examples/ (sourced, not run).
#
# Runs `python -m megatron_slm.pretrain "$@"` on every task: under SLURM through `srun` (one task
# per GPU, or per CPU process with DEVICE=cpu), otherwise through torchrun on this machine.
# With CONTAINER_IMAGE set, srun starts the tasks inside that image (pyxis/enroot).

PYTHON="${PYTHON:-python}"

launch_pretrain() {
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
        export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
        local container=()
        if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
            container=(--container-image "$CONTAINER_IMAGE" --container-workdir /opt/megatron-slm)
            [[ -n "${CONTAINER_MOUNTS:-}" ]] && container+=(--container-mounts "$CONTAINER_MOUNTS")
        fi
        # --kill-on-bad-exit: one failed rank ends the step instead of hanging the others.
        # exec + a forwarded SIGTERM let the trainer's --exit-signal-handler save a checkpoint.
        srun --kill-on-bad-exit=1 "${container[@]}" "$PYTHON" -m megatron_slm.pretrain "$@" &
        local pid=$! rc=0
        trap 'kill -TERM "$pid" 2>/dev/null' TERM
        wait "$pid" || rc=$?
        # A trapped signal interrupts `wait`: wait again until srun (the save) has finished.
        while kill -0 "$pid" 2>/dev/null; do wait "$pid" && rc=0 || rc=$?; done
        return "$rc"
    else
        "$PYTHON" -m torch.distributed.run --nproc-per-node "${NPROC_PER_NODE:-1}" \
            -m megatron_slm.pretrain "$@"
    fi
}
