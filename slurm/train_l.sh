#!/usr/bin/env bash
# Heptapod-L (477M parameters) on ImageNet 256 (KL-16 latents).
# Default shape for 80-141 GB GPUs: 4 nodes x 8 GPUs = 32 ranks, TP=1, PP=1, ZeRO-1,
# micro batch 64 -> data-parallel 32 x 64 x grad_accum 1 = global batch 2048 (sized by python -m heptapod_ds.plan).
# Submit from the repository root (logs go to logs/%x-%j.out, the run to runs/heptapod-L/):
#   sbatch slurm/train_l.sh [key=value ...]
#   sbatch --nodes=2 slurm/train_l.sh                    # another shape: grad_accum follows
#   TP=4 ZERO=3 MICRO_BATCH=16 sbatch slurm/train_l.sh   # knobs: TP PP ZERO MICRO_BATCH RUN_DIR DS_CONFIG
# Preemption: USR1 600 s before the time limit (or `scancel --signal=USR1 JOB`) -> the trainer saves
# and the job requeues itself; see slurm/_train.sh.
#SBATCH --job-name=heptapod-l
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
export PRESET=L HEPTAPOD_TEMPLATE=slurm/train_l.sh
export TP="${TP:-1}" PP="${PP:-1}" ZERO="${ZERO:-1}" MICRO_BATCH="${MICRO_BATCH:-64}"
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/_train.sh" "$@"
