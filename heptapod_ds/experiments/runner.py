"""Run the grid's training runs: one after another as subprocesses, or one per Slurm array task.

Each run lives in its own directory. ``ablate_run.json`` there records which variant, seed and
overrides it was started with (a later call with a changed grid is refused rather than mixing two
configurations in one directory) and every attempt's exit status and wall time. A run whose
``summary.json`` exists is finished and never rerun; one with a checkpoint resumes from it
(``checkpoint.resume=auto``); SIGINT/SIGTERM/SIGUSR1 are forwarded to the trainer, which saves a
checkpoint and exits with its requeue status.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from .grid import GridError, RunSpec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_PY = os.path.join(REPO, "heptapod_ds", "train.py")
RUN_FILE = "ablate_run.json"
LOG_FILE = "train.log"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

DONE, PARTIAL, NEW = "done", "partial", "new"


def run_state(spec: RunSpec) -> str:
    """``done`` (summary.json written), ``partial`` (a checkpoint to resume from) or ``new``."""
    if os.path.isfile(os.path.join(spec.run_dir, "summary.json")):
        return DONE
    if os.path.isfile(os.path.join(spec.run_dir, "checkpoints", "latest")):
        return PARTIAL
    return NEW


def read_record(run_dir: str) -> Optional[Dict]:
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _write_record(run_dir: str, record: Dict) -> None:
    path = os.path.join(run_dir, RUN_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def check_not_stale(spec: RunSpec) -> None:
    """Refuse a run directory that was started with other overrides than the grid now asks for."""
    record = read_record(spec.run_dir)
    if record is None:
        if run_state(spec) != NEW:
            raise GridError(f"run {spec.name}: {spec.run_dir} holds a run that this tool did not start (no "
                            f"{RUN_FILE}); choose another --out.")
        return
    if list(record.get("overrides", [])) != list(spec.overrides):
        before, now = dict(o.split("=", 1) for o in record["overrides"]), spec.override_dict()
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        shown = ", ".join(f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in diff)
        raise GridError(f"run {spec.name}: {spec.run_dir} was started with other overrides ({shown}). Write this "
                        f"grid to another --out, or delete that run directory to start it again.")


def train_command(spec: RunSpec, launcher: Sequence[str]) -> List[str]:
    return [*launcher, TRAIN_PY, *spec.overrides, f"run_dir={spec.run_dir}", "checkpoint.resume=auto",
            "logging.progress_bar=false"]


@dataclass
class Attempt:
    rc: int
    wall_s: float
    state_before: str
    signalled: bool = False  # we passed a stop signal on: the caller should stop the grid too


def last_step(metrics_path: str, _cache: Dict[str, tuple] = {}) -> int:  # noqa: B006 - offset cache
    """The newest step in a growing metrics.jsonl (reads only what was appended since the last call)."""
    if not os.path.isfile(metrics_path):
        return 0
    offset, step = _cache.get(metrics_path, (0, 0))
    size = os.path.getsize(metrics_path)
    if size < offset:  # truncated by a resume
        offset, step = 0, 0
    with open(metrics_path) as fh:
        fh.seek(offset)
        chunk = fh.read()
    complete, _, _rest = chunk.rpartition("\n")
    for line in complete.splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, ValueError, TypeError):
            continue
    _cache[metrics_path] = (offset + len(complete.encode()) + (1 if complete else 0), step)
    return step


def run_one(spec: RunSpec, launcher: Sequence[str], on_progress: Optional[Callable[[int], None]] = None,
            env: Optional[Dict[str, str]] = None, poll_s: float = 1.0) -> Attempt:
    """Start (or resume) one run and wait for it; the trainer's output goes to ``<run_dir>/train.log``.

    SIGINT, SIGTERM and SIGUSR1 received meanwhile are passed to the trainer (it checkpoints and exits
    with the requeue status), so a stopped grid loses no finished step.
    """
    check_not_stale(spec)
    os.makedirs(spec.run_dir, exist_ok=True)
    state = run_state(spec)
    record = read_record(spec.run_dir) or {"variant": spec.variant, "seed": spec.seed,
                                           "overrides": list(spec.overrides), "attempts": []}
    cmd = train_command(spec, launcher)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0))
    with open(os.path.join(spec.run_dir, LOG_FILE), "a") as log:
        log.write(f"\n===== ablate: {started} {state} run: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=REPO,
                                start_new_session=True)  # a terminal's Ctrl-C reaches it only through us
        got: List[int] = []

        def handler(sig, _frame):
            got.append(sig)
            _forward(proc, sig)

        previous = {sig: signal.signal(sig, handler) for sig in FORWARDED}
        try:
            metrics = os.path.join(spec.run_dir, "metrics.jsonl")
            while proc.poll() is None:
                if on_progress is not None:
                    on_progress(last_step(metrics))
                time.sleep(poll_s)
            if on_progress is not None:
                on_progress(last_step(metrics))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    attempt = Attempt(rc=proc.returncode, wall_s=time.time() - t0, state_before=state, signalled=bool(got))
    record["attempts"].append({"started": started, "rc": attempt.rc, "wall_s": round(attempt.wall_s, 3),
                               "state_before": state})
    _write_record(spec.run_dir, record)
    return attempt


def _forward(proc: subprocess.Popen, sig: int) -> None:
    """SIGINT becomes SIGTERM: the trainer's preemption handler saves and exits with the requeue status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM if sig == signal.SIGINT else sig)


def default_launcher() -> List[str]:
    return [sys.executable]
