#!/usr/bin/env bash
# Heptapod-B on ImageNet 256 (KL-16 latents): 2 nodes x 8 GPUs, TP=1, zero1.json.
# Submit from the repository root: sbatch slurm/train_b.sh [key=value ...]
#SBATCH --job-name=heptapod-b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --output=logs/%x-%j.out
export PRESET=B TP=${TP:-1} DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/_train.sh" "$@"
