#!/usr/bin/env bash
# Heptapod-H on ImageNet 256 (KL-16 latents): 16 nodes x 8 GPUs, TP=2, zero3.json.
# Submit from the repository root: sbatch slurm/train_h.sh [key=value ...]
#SBATCH --job-name=heptapod-h
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --output=logs/%x-%j.out
export PRESET=H TP=${TP:-2} DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/_train.sh" "$@"
