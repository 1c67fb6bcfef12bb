# shellcheck shell=bash
# The shared launcher of the slurm/*.sh jobs; sourced by _train.sh, pretokenize.sh and sample_fid.sh.
#
# launch_init              cd to the submit directory (the repository root), check it and the venv.
# launch_env               inside the job: export the rendezvous (MASTER_ADDR/PORT), the world size,
#                          threads and CPUs per task for srun, NCCL_DEBUG / PYTORCH_CUDA_ALLOC_CONF
#                          defaults, and the tasks' CPU binding (launch_cpu_bind).
# launch_srun CMD...       run CMD on every task with srun in the background while this batch shell
#                          waits, so that it can act on signals: SIGUSR1 is forwarded to the tasks
#                          (or, with LAUNCH_USR1=requeue, ends the step and asks for a requeue);
#                          SIGTERM/SIGINT (scancel, preemption, time limit) are forwarded as SIGUSR1
#                          so the trainer saves, and mark the job as stopped: no requeue from here.
#                          Sets LAUNCH_RC (srun's status), LAUNCH_STOPPED (TERM/INT or empty),
#                          LAUNCH_REQUEUE_ASKED (1 after SIGUSR1 with LAUNCH_USR1=requeue), and, for a
#                          SIGTERM that came with Slurm's requeue after a node failure (not a stop),
#                          LAUNCH_LOST (the nodes seen lost) / LAUNCH_SLURM_REQUEUED=1.
# launch_await_node_verdict  after a failed step: wait for the controller to decide about a lost node.
# launch_requeue REASON    scontrol requeue this job (it starts again with the same id).
#
# Why the batch shell waits in the background: bash runs a trap only after a foreground command
# returns, so a batch shell blocked on a foreground srun could not forward a signal in time.
# Why SIGUSR1 and not SIGTERM is forwarded: srun answers SIGTERM by SIGKILLing its tasks.

launch_log() { echo "[slurm $(date +%H:%M:%S)] $*"; }
launch_die() { echo "[slurm $(date +%H:%M:%S)] error: $*" >&2; exit 2; }

launch_init() {
  set -uo pipefail
  LAUNCH_REPO="${SLURM_SUBMIT_DIR:-$PWD}"
  cd "$LAUNCH_REPO" || launch_die "cannot enter the submit directory $LAUNCH_REPO"
  if [[ ! -f slurm/_launch.sh || ! -f heptapod_ds/train.py ]]; then
    launch_die "$LAUNCH_REPO is not the heptapod_ds repository root; submit from there: cd <repo> && sbatch slurm/<job>.sh"
  fi
  PY="${PYTHON:-.venv/bin/python}"
  if [[ ! -x "$PY" ]]; then
    launch_die "no Python at $PY (in $LAUNCH_REPO); run 'bash tools/setup.sh' on a login node first, or set PYTHON=/path/to/python"
  fi
  mkdir -p logs
}

launch_env() {
  [[ -n "${SLURM_JOB_ID:-}" ]] || launch_die "not inside a Slurm job; submit the job with sbatch slurm/<job>.sh"
  LAUNCH_ATTEMPT="${SLURM_RESTART_COUNT:-0}"
  # The world size: SLURM_NTASKS is set by --ntasks or --nodes with --ntasks-per-node.
  if [[ -z "${SLURM_NTASKS:-}" && -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then
    export SLURM_NTASKS=$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE))
  fi
  # Derived from this job, never inherited: sbatch exports the submitting shell's environment, and a
  # MASTER_ADDR left there from another run would send every rank to the wrong host.
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))   # what the trainer derives too
  export MASTER_ADDR MASTER_PORT
  # Slurm 22.05's srun no longer inherits --cpus-per-task from sbatch: hand it over explicitly,
  # or a task-binding cluster pins every rank (and its data workers) to one CPU.
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
  fi
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}"
  export PYTHONUNBUFFERED=1
  # GPU defaults, each kept when the submitting shell set it: NCCL's warnings (and why a communicator
  # failed) in the log, and PyTorch's expandable segments against fragmentation.
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
  LAUNCH_CPU_BIND="$(launch_cpu_bind)"
}

# The srun --cpu-bind of the tasks. CPU_BIND=<srun value> wins. Otherwise, on a job with GPUs and a cluster
# whose TaskPlugin can bind (task/affinity or task/cgroup), each task (one per GPU) is bound to its own
# --cpus-per-task cores; without GPUs, or where Slurm cannot bind (task/none), no binding.
launch_cpu_bind() {
  if [[ -n "${CPU_BIND:-}" ]]; then
    echo "$CPU_BIND"
    return
  fi
  local gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}"
  gpus="${gpus##*:}"   # "h100:8" -> 8
  if [[ -z "$gpus" || "$gpus" == 0 ]]; then
    echo none
    return
  fi
  case "$(scontrol show config 2>/dev/null | sed -n 's/^TaskPlugin *= *//p')" in
    *affinity*|*cgroup*) echo cores ;;
    *) echo none ;;
  esac
}

_launch_on_signal() {
  local sig="$1"
  case "$sig" in
    USR1)
      if [[ "${LAUNCH_USR1:-forward}" == requeue ]]; then
        launch_log "SIGUSR1: ending the job step; the job will be requeued and resume"
        LAUNCH_REQUEUE_ASKED=1
        kill -TERM "$LAUNCH_SRUN_PID" 2>/dev/null
        return
      fi
      launch_log "SIGUSR1: forwarded to the tasks"
      ;;
    *)
      # On a node failure slurmctld requeues the job and ends its steps on the other nodes; this shell may get
      # that SIGTERM before its KillWait SIGKILL (or only the SIGKILL). Asked at once, the controller still
      # reports the lost node, or the job's Restarts count already ahead of this attempt.
      if [[ "$sig" == TERM ]]; then
        LAUNCH_LOST="$(launch_lost_nodes)"
        launch_requeued_by_slurm && LAUNCH_SLURM_REQUEUED=1
      fi
      if [[ -n "$LAUNCH_LOST" || "$LAUNCH_SLURM_REQUEUED" == 1 ]]; then
        launch_log "SIGTERM from Slurm, which is requeueing this job; asking the tasks to save and stop (SIGUSR1)"
        if [[ -n "$LAUNCH_LOST" ]]; then
          launch_node_lost_message "$LAUNCH_LOST"
        else
          launch_log "Slurm requeued this job while attempt $LAUNCH_ATTEMPT ran (a node of it failed, or" \
                     "scontrol requeue); the next attempt resumes from the newest complete checkpoint"
        fi
      else
        LAUNCH_STOPPED="$sig"
        launch_log "SIG$sig: the job is being cancelled, preempted or is out of time; asking the tasks to save" \
                   "and stop (SIGUSR1); this script will not requeue it"
      fi
      ;;
  esac
  kill -USR1 "$LAUNCH_SRUN_PID" 2>/dev/null
}

# shellcheck disable=SC2034  # LAUNCH_STOPPED, LAUNCH_REQUEUE_ASKED, LAUNCH_RC: results for the caller
launch_srun() {
  LAUNCH_STOPPED=""
  LAUNCH_LOST=""
  LAUNCH_SLURM_REQUEUED=0
  LAUNCH_REQUEUE_ASKED=0
  local srun_args=(--kill-on-bad-exit=1 "--cpu-bind=${LAUNCH_CPU_BIND:-none}")
  [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  LAUNCH_COMMAND="srun ${srun_args[*]} $(printf '%q ' "$@")"
  export HEPTAPOD_LAUNCH_COMMAND="$LAUNCH_COMMAND"
  launch_log "job $SLURM_JOB_ID attempt $LAUNCH_ATTEMPT: ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NUM_NODES:-?} node(s)" \
             "[$SLURM_JOB_NODELIST], master $MASTER_ADDR:$MASTER_PORT"
  launch_log "$LAUNCH_COMMAND"
  trap '_launch_on_signal TERM' TERM
  trap '_launch_on_signal INT' INT
  trap '_launch_on_signal USR1' USR1
  srun "${srun_args[@]}" "$@" &
  LAUNCH_SRUN_PID=$!
  # A trapped signal interrupts `wait` with a status > 128 while srun still runs: wait again.
  while :; do
    wait "$LAUNCH_SRUN_PID"
    LAUNCH_RC=$?
    kill -0 "$LAUNCH_SRUN_PID" 2>/dev/null || break
  done
  trap - TERM INT USR1
  launch_log "srun exited with status $LAUNCH_RC"
}

# The nodes of this job that Slurm reports down or not responding (sinfo's "*"), space-separated; empty
# when all answer. A failed step whose node was lost is requeued by Slurm itself (JobRequeue=1).
launch_lost_nodes() {
  sinfo -h -N -n "$SLURM_JOB_NODELIST" -o '%N %t' 2>/dev/null \
    | awk '$2 ~ /\*$/ || $2 ~ /^(down|drain|fail)/ { print $1 }' | sort -u | tr '\n' ' ' | sed 's/ $//'
}

# After a failed step that a lost node may explain (a collective failed, or rank 0 left no exit record): wait
# for the controller's verdict instead of concluding at once. Slurm marks a node that stopped answering down
# only after SlurmdTimeout, and srun can return before that (it gives up on an unreachable node's tasks
# KillWait + 2 s after the step was aborted). On its verdict slurmctld requeues the job (JobRequeue=1) and
# ends this batch shell at once, without SIGTERM first: nothing after that is logged; slurmstepd writes
# "*** JOB N ON HOST CANCELLED AT ... DUE TO NODE FAILURE ***" into this log instead. A batch shell that
# ended before the verdict would end the job as FAILED, with no requeue. So this says what it waits for,
# then polls the nodes of this job for up to SlurmdTimeout + 30 s (LAUNCH_NODE_WAIT_S overrides): a node
# seen down or not responding is named (once); if the shell is still alive at the end, it says how it ended.
# Sets LAUNCH_LOST (the nodes seen lost, space-separated; empty: none).
launch_await_node_verdict() {
  local wait_s="${LAUNCH_NODE_WAIT_S:-}" slurmd_timeout
  if [[ -z "$wait_s" ]]; then
    slurmd_timeout="$(scontrol show config 2>/dev/null | sed -n 's/^SlurmdTimeout *= *\([0-9]*\).*/\1/p' | head -n 1)"
    wait_s=$(( ${slurmd_timeout:-300} + 30 ))
  fi
  LAUNCH_LOST=""
  launch_log "waiting up to ${wait_s}s for Slurm's verdict on the nodes of this job: a node that stopped answering" \
             "is marked down after SlurmdTimeout, and Slurm then requeues the job and ends this script at once"
  trap '_launch_verdict_term' TERM
  local t0=$SECONDS lost poll=$(( wait_s > 60 ? 5 : 1 ))   # no sinfo every second for minutes on a big cluster
  while (( SECONDS - t0 < wait_s )); do
    lost="$(launch_lost_nodes)"
    if [[ -n "$lost" && -z "$LAUNCH_LOST" ]]; then
      LAUNCH_LOST="$lost"
      launch_node_lost_message "$lost"
    fi
    sleep "$poll"
  done
  trap - TERM
}

_launch_verdict_term() {
  local lost
  if [[ -z "$LAUNCH_LOST" ]]; then
    lost="$(launch_lost_nodes)"
    [[ -n "$lost" ]] && launch_node_lost_message "$lost"
  fi
  launch_log "SIGTERM from Slurm while waiting for its verdict: the job is being requeued (or cancelled)"
  exit 0
}

launch_node_lost_message() {
  launch_log "node(s) $1 of this job stopped responding; Slurm requeues a job that loses a node (JobRequeue," \
             "--requeue), and the next attempt resumes from the newest complete checkpoint; this script does not" \
             "requeue it itself"
}

# True when the controller already counts more restarts of this job than this attempt's (it requeued the job).
launch_requeued_by_slurm() {
  local restarts
  restarts="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Restarts=\([0-9]*\).*/\1/p' | head -n 1)"
  [[ -n "$restarts" && "$restarts" -gt "${LAUNCH_ATTEMPT:-0}" ]]
}

launch_requeue() {
  launch_log "requeueing job $SLURM_JOB_ID: $*"
  if scontrol requeue "$SLURM_JOB_ID"; then
    return 0
  fi
  launch_log "error: 'scontrol requeue $SLURM_JOB_ID' failed (job submitted with --no-requeue, or requeue" \
             "disabled on this cluster); submit the same command again to resume"
  return 1
}
