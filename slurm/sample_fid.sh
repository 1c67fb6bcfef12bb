#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Sample from a trained model and score FID on GPUs: each task draws its share of the images, the
# Inception statistics are reduced across tasks. Submit from the repository root; the arguments are
# tools/sample_fid.py's:
#   sbatch slurm/sample_fid.sh --ckpt runs/heptapod-XL/checkpoints/global_step500000 --num-samples 50000 \
#       --out runs/heptapod-XL/fid50k [--ref-stats adm_in256_stats.npz] [--inception bundled|FILE] \
#       [--seed 0] [--batch-size 64] [--temperature 1.0]
#   sbatch --nodes=4 slurm/sample_fid.sh ...             # more tasks: the same images (per-image seeds)
# Resumable: finished shards of images are kept in --out, so a requeued or resubmitted job with the same
# arguments draws only the missing ones. 300 s before the time limit the batch shell gets SIGUSR1
# (B:), ends the step and requeues the job.
#SBATCH --job-name=heptapod-fid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# shellcheck source=_launch.sh
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
launch_init
[[ -f tools/sample_fid.py ]] || launch_die "tools/sample_fid.py is missing from $LAUNCH_REPO; update the checkout"
launch_env
# shellcheck disable=SC2034  # read by _launch_on_signal
LAUNCH_USR1=requeue
launch_srun "$PY" tools/sample_fid.py "$@"
if [[ "$LAUNCH_REQUEUE_ASKED" == 1 && -z "$LAUNCH_STOPPED" ]]; then
  launch_requeue "out of time; finished shards are kept and the next attempt draws the rest" && exit 0
  exit 75
fi
exit "$LAUNCH_RC"
