#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Shared body of slurm/train_{b,l,xl,h}.sh: one task per GPU under srun, automatic resume, and a
# requeue when the trainer stopped after a preemption signal with its checkpoint saved.
#
# Knobs (environment; the templates set defaults, and any of them can be given at submission,
# e.g. `TP=4 ZERO=3 sbatch slurm/train_xl.sh`): PRESET, TP (parallel.tensor), PP (parallel.pipeline),
# ZERO (parallel.zero_stage, with ds_configs/zero<ZERO>.json), MICRO_BATCH (train.micro_batch_size),
# DS_CONFIG (a DeepSpeed JSON of your own instead of ZERO), RUN_DIR, EXTRA (more key=value),
# PYTHON. key=value arguments after the script name come last and win over all of these (also over
# the GPU defaults parallel.backend=nccl and backbone.transformer_impl=local).
# The world size is what Slurm gives the job (--nodes x --ntasks-per-node); train.grad_accum is
# derived from it so that the global batch stays the preset's.
#
# HEPTAPOD_DRY_RUN=1 (outside Slurm, with SLURM_NTASKS=<world size>): print the resolved config (stdout)
# and its capacity plan (stderr, python -m heptapod_ds.plan; GPU_MEMORY_GIB=141 for an H200) and exit; the
# config check is also what every job runs before srun starts its tasks.
#
# How a preemption becomes a requeue: `--signal=USR1@600` (templates) or `scancel --signal=USR1 JOB`
# reach the trainer directly; every rank finishes its step, the checkpoint is saved, rank 0 writes
# the exit record ($HEPTAPOD_EXIT_FILE, status "preempted") and all ranks exit 75 together. This
# script then reads the record, not srun's status (srun --kill-on-bad-exit reports the first
# non-zero task and may report the others as killed), and runs `scontrol requeue`. The requeued
# attempt resumes from the newest complete checkpoint (checkpoint.resume=auto). A job this shell
# saw SIGTERM for (scancel, time limit, preemption by the scheduler) is not requeued from here.
# shellcheck source=_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
launch_init

PRESET="${PRESET:?set PRESET (tiny, B, L, XL or H)}"
TP="${TP:-1}"
PP="${PP:-1}"
ZERO="${ZERO:-1}"
MICRO_BATCH="${MICRO_BATCH:-}"
RUN_DIR="${RUN_DIR:-runs/heptapod-${PRESET}}"
REQUEUE_EXIT=75   # heptapod_ds.engine.REQUEUE_EXIT_CODE (EX_TEMPFAIL); a test keeps the two equal

args=()
if [[ -n "${DS_CONFIG:-}" ]]; then
  args+=(--ds_config "$DS_CONFIG")                   # its ZeRO stage wins over ZERO
else
  args+=("parallel.zero_stage=$ZERO")                # uses ds_configs/zero$ZERO.json
fi
args+=("preset=$PRESET" "run_dir=$RUN_DIR" "parallel.tensor=$TP" "parallel.pipeline=$PP")
[[ -n "$MICRO_BATCH" ]] && args+=("train.micro_batch_size=$MICRO_BATCH")
args+=(train.grad_accum=0 checkpoint.resume=auto)
# First-run defaults of a GPU job: NCCL, so that a task that got no GPU stops at once instead of training on
# its CPU (a CPU run of the template passes parallel.backend=gloo), and megatron's local layers until a
# TransformerEngine run has been checked on the cluster (backbone.transformer_impl=transformer_engine).
args+=(parallel.backend=nccl backbone.transformer_impl=local)
if [[ -n "${EXTRA:-}" ]]; then
  read -r -a extra <<< "$EXTRA"
  args+=("${extra[@]}")
fi
args+=("$@")

# Validate once on the batch host, at the world size of this allocation, before srun starts a
# task per GPU: a bad combination fails here with one message instead of one per rank.
world="${SLURM_NTASKS:-}"
if [[ -z "$world" && -n "${SLURM_NTASKS_PER_NODE:-}" && -n "${SLURM_JOB_NUM_NODES:-}" ]]; then
  world=$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE))
fi
[[ -n "$world" ]] || launch_die "unknown world size: submit with sbatch (or set SLURM_NTASKS for a dry run)"
# stdout is the config; stderr (errors, and import-time warnings of torch/megatron) is shown on failure.
check_err="$(mktemp)"
if ! config_yaml="$(WORLD_SIZE="$world" "$PY" heptapod_ds/train.py "${args[@]}" --print-config 2>"$check_err")"; then
  cat "$check_err" >&2
  rm -f "$check_err"
  launch_die "the configuration is invalid for $world tasks (see above); change the sbatch shape" \
             "(--nodes, --ntasks-per-node) or the knobs/overrides (TP, PP, ZERO, MICRO_BATCH, key=value)"
fi
rm -f "$check_err"
if [[ "${HEPTAPOD_DRY_RUN:-0}" == 1 ]]; then
  echo "$config_yaml"
  # and the capacity plan of exactly that config at this world size, on stderr (stdout stays the config)
  plan_cfg="$(mktemp --suffix=.yaml)"
  echo "$config_yaml" > "$plan_cfg"
  WORLD_SIZE="$world" "$PY" -m heptapod_ds.plan --config "$plan_cfg" --gpus "$world" \
    ${GPU_MEMORY_GIB:+--gpu-memory-gib "$GPU_MEMORY_GIB"} >&2 2>/dev/null \
    || echo "(the planner could not run on this config)" >&2
  rm -f "$plan_cfg"
  exit 0
fi

launch_env
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron's TP overlap wants in-order kernel launches
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-heptapod-${PRESET}}"
export HEPTAPOD_LAUNCH_SCRIPT="${HEPTAPOD_TEMPLATE:-slurm/_train.sh}${*:+ $(printf '%q ' "$@")}"
export HEPTAPOD_EXIT_FILE="$LAUNCH_REPO/logs/.heptapod-exit-$SLURM_JOB_ID-$LAUNCH_ATTEMPT.json"
rm -f "$HEPTAPOD_EXIT_FILE"

# A requeued attempt must not start before the controller has delivered the kill of the attempt it replaced
# to every node of that attempt: slurmctld retries that kill to a node that did not answer (crashed, cut off)
# about 60 s later, by job id, and a new attempt of the same job id already running there is killed with it
# (its tasks get SIGTERM, and SIGKILL after KillWait). Slurm holds a requeued job for AuthInfo's cred_expire
# + 1 s (120 s by default), which covers the retry; a cluster configured with less is warned about here.
if [[ "$LAUNCH_ATTEMPT" -gt 0 ]]; then
  cred_expire="$(scontrol show config 2>/dev/null | sed -n 's/^AuthInfo *= *.*cred_expire=\([0-9]*\).*/\1/p' | head -n 1)"
  if [[ -n "$cred_expire" && "$cred_expire" -lt 61 ]]; then
    launch_log "warning: this cluster's AuthInfo cred_expire=$cred_expire (< 61 s) lets a requeued job start before" \
               "slurmctld's retried kill of the previous attempt (about 60 s after a node failure) reaches a node" \
               "that came back; that kill then stops this attempt there (SIGTERM on that node's tasks)"
  fi
fi
launch_srun "$PY" heptapod_ds/train.py "${args[@]}"

status=""
record=""
if [[ -f "$HEPTAPOD_EXIT_FILE" ]]; then
  record="$(cat "$HEPTAPOD_EXIT_FILE")"
  launch_log "trainer exit record: $record"
  status="$(sed -n 's/.*"status": *"\([a-z]*\)".*/\1/p' "$HEPTAPOD_EXIT_FILE" | head -n 1)"
  rm -f "$HEPTAPOD_EXIT_FILE"
fi
case "$status" in
  done)
    launch_log "training finished"
    exit 0
    ;;
  preempted)
    # Which tasks got which signal (the record's "signals"). A SIGTERM that reached only some nodes' tasks
    # while this shell got none was sent by Slurm to this job's steps on those nodes: after a node of this job
    # came back from a failure, the controller kills the steps of the earlier attempt it finds there by job
    # id ("Registered PENDING JobId=..." in slurmctld's log), which also hits this attempt's step when it had
    # started on that node. The trainer saved; the requeue below resumes from that checkpoint.
    launch_log "$(printf '%s' "$record" | "$PY" -c '
import json, sys
rec = json.loads(sys.stdin.read() or "{}")
sigs = rec.get("signals") or {}
said = "; ".join("%s on ranks %s (%s)" % (n, v["ranks"], ", ".join(v["hosts"])) for n, v in sigs.items())
print("stopped by %s at step %s" % (said or "a signal", rec.get("step")))
' 2>/dev/null || echo "stopped by a signal")"
    if [[ -n "$LAUNCH_LOST" || "$LAUNCH_SLURM_REQUEUED" == 1 ]]; then
      launch_log "checkpoint saved; Slurm requeues this job${LAUNCH_LOST:+ for the lost node(s) $LAUNCH_LOST}" \
                 "(not requeued again from here); the next attempt resumes from the newest complete checkpoint"
      exit 0
    fi
    if [[ -n "$LAUNCH_STOPPED" ]]; then
      launch_log "checkpoint saved; the job was stopped by SIG$LAUNCH_STOPPED and is not requeued from here" \
                 "(a scheduler preemption with PreemptMode=REQUEUE requeues it; otherwise submit again to resume)"
      exit $((128 + 15))
    fi
    if [[ "$record" == *'"SIGTERM"'* ]]; then
      launch_log "SIGTERM reached the tasks but not this batch shell: Slurm ended this job's step on some node" \
                 "(a step of an earlier attempt of job $SLURM_JOB_ID left on a node that came back, killed by job id," \
                 "or scancel --signal=TERM); requeueing to resume"
    fi
    launch_requeue "the trainer saved a checkpoint after a preemption signal; the next attempt resumes from it" \
      && exit 0
    exit "$REQUEUE_EXIT"
    ;;
  *)
    launch_log "the trainer did not finish (srun status $LAUNCH_RC${status:+, trainer status $status})"
    lost="$LAUNCH_LOST"
    if [[ -n "$lost" || "$LAUNCH_SLURM_REQUEUED" == 1 ]]; then
      lost="${lost:-(requeued by Slurm)}"   # said when the SIGTERM came
    elif lost="$(launch_lost_nodes)" && [[ -n "$lost" ]]; then
      launch_node_lost_message "$lost"
    elif [[ -z "$LAUNCH_STOPPED" && ( -z "$status" || "$record" == *'"reason": "collective"'* ) ]]; then
      # a peer died or hangs, or rank 0 left no record: most likely a node of this job failed (see
      # launch_await_node_verdict); Slurm's requeue usually ends this script while it waits
      launch_await_node_verdict
      lost="$LAUNCH_LOST"
      if [[ -n "$lost" ]]; then
        launch_log "node(s) $lost stopped responding, but Slurm did not requeue the job within the wait;" \
                   "submit the same command again to resume from the newest complete checkpoint"
      fi
    fi
    if [[ -z "$lost" ]]; then
      launch_log "not requeueing from here (no node of this job is reported down)"
    fi
    [[ "$LAUNCH_RC" -ne 0 ]] && exit "$LAUNCH_RC"
    exit 1
    ;;
esac
