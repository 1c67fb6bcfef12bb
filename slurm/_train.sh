#!/usr/bin/env bash
# Shared body of the slurm/train_*.sh templates: one task per GPU under srun, automatic resume,
# requeue when the trainer exits with its "preempted, checkpoint saved" status.
# Knobs (environment): PRESET, DS_CONFIG, RUN_DIR, TP, EXTRA (extra key=value overrides).
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
if [[ ! -x .venv/bin/python ]]; then
  echo "error: .venv missing in $(pwd); run 'bash tools/setup.sh' on a login node first" >&2
  exit 2
fi
PRESET="${PRESET:?set PRESET (B, L, XL or H)}"
DS_CONFIG="${DS_CONFIG:-ds_configs/zero3.json}"
RUN_DIR="${RUN_DIR:-runs/heptapod-${PRESET}}"
TP="${TP:-1}"
mkdir -p "$RUN_DIR" logs

export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}"
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron's TP overlap wants in-order kernel launch
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-heptapod-${PRESET}}"
# The exit status the trainer uses for "stopped by SIGTERM/SIGUSR1, checkpoint saved".
REQUEUE_EXIT="$(.venv/bin/python -c 'from heptapod_ds.engine import REQUEUE_EXIT_CODE as c; print(c)')"

echo "[slurm] job $SLURM_JOB_ID: preset=$PRESET nodes=$SLURM_JOB_NUM_NODES tasks=$SLURM_NTASKS tp=$TP run_dir=$RUN_DIR"
srun --kill-on-bad-exit=1 --cpu-bind=none \
  .venv/bin/python heptapod_ds/train.py --ds_config "$DS_CONFIG" \
    preset="$PRESET" run_dir="$RUN_DIR" parallel.tensor="$TP" checkpoint.resume=auto ${EXTRA:-} "$@"
rc=$?
if [[ $rc -eq $REQUEUE_EXIT ]]; then
  echo "[slurm] trainer saved a checkpoint after a preemption signal; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $rc
