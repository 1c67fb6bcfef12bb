#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Pre-tokenize an ImageFolder tree (ImageNet train/) into an FFCV beton: one task per GPU, the fixed-size
# shards spread over all tasks (rank r encodes shards r, r+W, ...), rank 0 merges them at the end.
# Submit from the repository root; the arguments are tools/pretokenize.py's (see its --help):
#   sbatch slurm/pretokenize.sh --input /data/imagenet/train --output data/imagenet256_kl16.beton \
#       --tokenizer kl16 --tokenizer-ckpt pretrained/kl16.ckpt
#   sbatch --nodes=4 slurm/pretokenize.sh ...            # more tasks: the same shards, spread wider
# Resumable: a finished shard is kept on disk, so a requeued or resubmitted job (any number of tasks)
# encodes only the shards that are missing. 300 s before the time limit the batch shell gets SIGUSR1
# (B:), ends the step and requeues the job; the shard in progress on each task is redone.
#SBATCH --job-name=heptapod-pretokenize
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# shellcheck source=_launch.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
launch_init
launch_env
# shellcheck disable=SC2034  # read by _launch_on_signal
LAUNCH_USR1=requeue
# Decoding threads per task follow the CPUs Slurm gave it; a --decode-workers argument wins.
launch_srun "$PY" tools/pretokenize.py --decode-workers "${SLURM_CPUS_PER_TASK:-8}" "$@"
if [[ "$LAUNCH_REQUEUE_ASKED" == 1 && -z "$LAUNCH_STOPPED" ]]; then
  launch_requeue "out of time; finished shards are kept and the next attempt skips them" && exit 0
  exit 75
fi
exit "$LAUNCH_RC"
