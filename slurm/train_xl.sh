#!/usr/bin/env bash
# Heptapod-XL (684M parameters) on ImageNet 256 (KL-16 latents).
# Default shape for 80-141 GB GPUs: 8 nodes x 8 GPUs = 64 ranks, TP=2, PP=1, ZeRO-2,
# micro batch 64 -> data-parallel 32 x 64 x grad_accum 1 = global batch 2048.
# Submit from the repository root (logs go to logs/%x-%j.out, the run to runs/heptapod-XL/):
#   sbatch slurm/train_xl.sh [key=value ...]
#   sbatch --nodes=4 slurm/train_xl.sh                   # another shape: grad_accum follows
#   TP=4 ZERO=3 MICRO_BATCH=16 sbatch slurm/train_xl.sh  # knobs: TP PP ZERO MICRO_BATCH RUN_DIR DS_CONFIG
# Preemption: USR1 600 s before the time limit (or `scancel --signal=USR1 JOB`) -> the trainer saves
# and the job requeues itself; see slurm/_train.sh.
#SBATCH --job-name=heptapod-xl
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
export PRESET=XL HEPTAPOD_TEMPLATE=slurm/train_xl.sh
export TP="${TP:-2}" PP="${PP:-1}" ZERO="${ZERO:-2}" MICRO_BATCH="${MICRO_BATCH:-64}"
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/_train.sh" "$@"
