#!/usr/bin/env bash
# Heptapod-B (207M parameters) on ImageNet 256 (KL-16 latents).
# Default shape for 80-141 GB GPUs: 2 nodes x 8 GPUs = 16 ranks, TP=1, PP=1, ZeRO-1,
# micro batch 128 -> data-parallel 16 x 128 x grad_accum 1 = global batch 2048 (sized by python -m heptapod_ds.plan).
# Submit from the repository root (logs go to logs/%x-%j.out, the run to runs/heptapod-B/):
#   sbatch slurm/train_b.sh [key=value ...]
#   sbatch --nodes=1 slurm/train_b.sh                    # another shape: grad_accum follows
#   TP=4 ZERO=3 MICRO_BATCH=16 sbatch slurm/train_b.sh   # knobs: TP PP ZERO MICRO_BATCH RUN_DIR DS_CONFIG
# Preemption: USR1 600 s before the time limit (or `scancel --signal=USR1 JOB`) -> the trainer saves
# and the job requeues itself; see slurm/_train.sh.
#SBATCH --job-name=heptapod-b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
export PRESET=B HEPTAPOD_TEMPLATE=slurm/train_b.sh
export TP="${TP:-1}" PP="${PP:-1}" ZERO="${ZERO:-1}" MICRO_BATCH="${MICRO_BATCH:-128}"
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/_train.sh" "$@"
