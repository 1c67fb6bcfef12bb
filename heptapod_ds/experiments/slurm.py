"""The grid as a Slurm array: one array task per unfinished run, then a report job after all of them.

Each array task runs ``tools/ablate.py GRID --out OUT --task I`` (the same code as a local run), so
resumption, the run record and the refusal of stale run directories behave identically. A task whose
trainer was preempted (exit status 75, checkpoint saved) requeues itself.
"""
from __future__ import annotations

import os
import shlex
import subprocess
from typing import List, Optional, Sequence, Tuple

from .grid import GridError

ARRAY_SCRIPT = "ablate_array.sbatch"


def array_script(grid_path: str, out_dir: str, indices: Sequence[int], job_name: str, python: str,
                 tool_args: Sequence[str], sbatch_args: Sequence[str] = (), repo: str = ".") -> str:
    """Text of the sbatch array script; ``indices`` are the runs (positions in the grid's run list) to do."""
    if not indices:
        raise GridError("no unfinished run to submit: every run of the grid is done (the report is up to date "
                        "with `tools/ablate.py GRID --out OUT --report-only`).")
    array = ",".join(str(i) for i in indices)
    logs = os.path.join(out_dir, "slurm")
    extra = "".join(f"#SBATCH {a}\n" for a in sbatch_args)
    task = " ".join(shlex.quote(a) for a in [python, os.path.join(repo, "tools", "ablate.py"), grid_path,
                                                "--out", out_dir, *tool_args])
    return f"""#!/usr/bin/env bash
# Written by tools/ablate.py: one array task per unfinished run of the grid {grid_path}.
#SBATCH --job-name={job_name}
#SBATCH --array={array}
#SBATCH --ntasks=1
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output={logs}/%x-%A_%a.out
{extra}set -uo pipefail
cd {shlex.quote(repo)} || exit 2
# The trainer's status for "stopped by a preemption signal, checkpoint saved".
REQUEUE_EXIT=75
srun --ntasks=1 {task} --task "$SLURM_ARRAY_TASK_ID"
rc=$?
if [[ $rc -eq $REQUEUE_EXIT ]]; then
  echo "[ablate] run $SLURM_ARRAY_TASK_ID saved a checkpoint after a preemption signal; requeueing"
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
  exit 0
fi
exit $rc
"""


def submit(script_path: str, out_dir: str, report_cmd: List[str], job_name: str,
           sbatch: str = "sbatch", sbatch_args: Sequence[str] = ()) -> Tuple[str, Optional[str]]:
    """Submit the array, then a report job that runs once every task has ended; returns both job ids."""
    os.makedirs(os.path.join(out_dir, "slurm"), exist_ok=True)  # a missing --output folder holds the job forever
    array_id = _sbatch([sbatch, "--parsable", script_path])
    wrap = " ".join(shlex.quote(a) for a in report_cmd)
    report_id = _sbatch([sbatch, "--parsable", f"--dependency=afterany:{array_id}", f"--job-name={job_name}-report",
                         "--ntasks=1", f"--output={os.path.join(out_dir, 'slurm', '%x-%j.out')}", *sbatch_args,
                         f"--wrap={wrap}"])
    return array_id, report_id


def _sbatch(cmd: List[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise GridError(f"'{cmd[0]}' not found: --slurm needs Slurm's sbatch on PATH (or --dry-run to only write "
                        f"the script).") from None
    if proc.returncode != 0:
        raise GridError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
