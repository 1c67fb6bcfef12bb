"""What ran: an append-only ``{run_dir}/launches.jsonl`` with one record per launch and per exit.

A run directory outlives many launches (a preempted Slurm job is requeued under the same job id,
a run is resumed on another shape, a config is changed on resume), and ``config.yaml`` only holds
the latest. Rank 0 appends:

- ``{"event": "launch", ...}`` before training: time, host, the git commit of the code and whether
  its tracked files differed from it (``dirty``, with the changed paths), the trainer's command
  line, the launching script and srun command (``HEPTAPOD_LAUNCH_SCRIPT`` / ``HEPTAPOD_LAUNCH_COMMAND``,
  set by ``slurm/_train.sh``), the Slurm job (id, attempt = ``SLURM_RESTART_COUNT``, nodes, tasks),
  the parallel layout, the rendezvous (``master``), every rank's host, address and local rank
  (``ranks``), and the resolved config with its hash;
- ``{"event": "exit", ...}`` at the end: ``status`` ``done`` / ``preempted`` / ``failed``, the exit
  code and step. The same record is written to ``$HEPTAPOD_EXIT_FILE`` when set: the Slurm batch
  script decides on a requeue from it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional

LAUNCHES = "launches.jsonl"
EXIT_FILE_ENV = "HEPTAPOD_EXIT_FILE"

# Slurm variables worth keeping, as SLURM_<NAME> -> <name>.
_SLURM_KEYS = ("JOB_ID", "RESTART_COUNT", "ARRAY_JOB_ID", "ARRAY_TASK_ID", "JOB_NAME", "JOB_PARTITION",
               "JOB_ACCOUNT", "JOB_QOS", "CLUSTER_NAME", "JOB_NODELIST", "JOB_NUM_NODES", "NTASKS",
               "NTASKS_PER_NODE", "CPUS_PER_TASK", "GPUS_PER_NODE", "SUBMIT_DIR", "SUBMIT_HOST")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_state(path: Optional[str] = None) -> Dict[str, Any]:
    """Commit of the checkout holding ``path`` (default: this package) and whether tracked files differ."""
    path = path or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=60)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            lines = head.stderr.strip().splitlines()
            return {"commit": None, "dirty": None, "error": lines[-1] if lines else "git rev-parse failed"}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError) as e:
        return {"commit": None, "dirty": None, "error": f"git unavailable: {e}"}
    changed: List[str] = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    out: Dict[str, Any] = {"commit": head.stdout.strip(), "dirty": bool(changed) if status.returncode == 0 else None}
    if changed:
        out["changed"] = changed[:100]
    return out


def slurm_state(env=None) -> Optional[Dict[str, str]]:
    """The Slurm job this process runs in (None outside Slurm)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None
    return {k.lower(): env[f"SLURM_{k}"] for k in _SLURM_KEYS if f"SLURM_{k}" in env}


def _append(run_dir: str, record: Dict[str, Any]) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, LAUNCHES), "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _rank_map() -> Optional[List[Dict[str, Any]]]:
    """Per global rank: host, the address its hostname resolves to (what gloo advertises to its peers), local
    rank, the launcher's own numbering (``SLURM_PROCID`` / ``SLURM_LOCALID``) and pid. Collective over the
    world group (every rank calls it); None outside one."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = None
    mine = {"host": host, "address": address, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "slurm_procid": os.environ.get("SLURM_PROCID"), "slurm_localid": os.environ.get("SLURM_LOCALID"),
            "slurm_nodeid": os.environ.get("SLURM_NODEID"), "pid": os.getpid()}
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [{"rank": r, **entry} for r, entry in enumerate(everyone)]


def record_launch(cfg, argv: Optional[List[str]] = None, layout: Optional[Dict[str, int]] = None,
                  ranks: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Append the launch record of this attempt to ``{cfg.run_dir}/launches.jsonl`` (call on rank 0)."""
    from heptapod_ds.config import to_dict

    config = to_dict(cfg)
    slurm = slurm_state()
    record = {
        "event": "launch", "time": _now(), "host": socket.gethostname(), "cwd": os.getcwd(),
        "argv": [sys.executable, *(sys.argv if argv is None else argv)],
        "script": os.environ.get("HEPTAPOD_LAUNCH_SCRIPT"),
        "command": os.environ.get("HEPTAPOD_LAUNCH_COMMAND"),
        "git": git_state(),
        "slurm": slurm,
        "attempt": int(slurm.get("restart_count", 0)) if slurm else None,
        "layout": layout,
        "master": {"addr": os.environ.get("MASTER_ADDR"), "port": os.environ.get("MASTER_PORT")},
        "ranks": ranks,
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "config": config,
    }
    _append(cfg.run_dir, record)
    return record


def record_exit(run_dir: str, status: str, exit_code: int, step: Optional[int], **extra: Any) -> Dict[str, Any]:
    """Append the exit record and write it to ``$HEPTAPOD_EXIT_FILE`` if set (call on rank 0)."""
    if status not in ("done", "preempted", "failed"):
        raise ValueError(f"exit status must be done, preempted or failed, got {status!r}")
    slurm = slurm_state()
    record = {"event": "exit", "time": _now(), "status": status, "exit_code": int(exit_code), "step": step,
              "slurm_job_id": slurm.get("job_id") if slurm else None,
              "attempt": int(slurm.get("restart_count", 0)) if slurm else None, **extra}
    _append(run_dir, record)
    path = os.environ.get(EXIT_FILE_ENV)
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        os.replace(tmp, path)
    return record


def _stop_signals(signal_name: Optional[str]) -> Dict[str, Dict[str, list]]:
    """Which ranks (and on which hosts) received which stop signal: ``{"SIGTERM": {"ranks": [2, 3],
    "hosts": ["node2"]}}``. Collective over the world group (every rank calls it); {} outside one.

    The ranks agree to stop when any of them got a signal, so rank 0's own signal does not say what
    stopped the run: a SIGTERM delivered by Slurm to the tasks of one node only (the kill of a job step)
    leaves rank 0 with none."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return {signal_name: {"ranks": [0], "hosts": [socket.gethostname()]}} if signal_name else {}
    mine = (signal_name, socket.gethostname())
    everyone: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out: Dict[str, Dict[str, list]] = {}
    for rank, (name, host) in enumerate(everyone):
        if name:
            entry = out.setdefault(name, {"ranks": [], "hosts": []})
            entry["ranks"].append(rank)
            if host not in entry["hosts"]:
                entry["hosts"].append(host)
    return out


class RunRecord:
    """``with RunRecord(cfg, info, argv) as r: ...; r.finished(code, step)``: the launch record on entry,
    the exit record on :meth:`finished` (``done`` for 0, else ``preempted``) or ``failed`` if the block
    raises. Only rank 0 (``info.rank == 0``) writes; :meth:`finished` is called on every rank.

    The exit record says what stopped the run: after a signal, ``signals`` names every rank that got
    one (and ``signal`` is rank 0's, or the first rank's when rank 0 got none); after a failure, the step
    that failed (:attr:`trainer`'s step when it is set), ``error``, and for a failed collective (a rank
    or node lost) ``reason: "collective"`` with the newest complete checkpoint to resume from."""

    def __init__(self, cfg, info, argv: Optional[List[str]] = None):
        self.cfg, self.rank0 = cfg, info.rank == 0
        self.argv = sys.argv if argv is None else [sys.argv[0], *argv]
        self.layout = {"world": info.world_size, "tensor": info.tp_size, "pipeline": info.pp_size,
                       "data": info.dp_size}
        self.step: Optional[int] = None
        self.trainer = None  # set by the entry point: its step and checkpoints are read at a failure

    def __enter__(self) -> "RunRecord":
        ranks = _rank_map()  # collective: every rank enters
        if self.rank0:
            record_launch(self.cfg, argv=self.argv, layout=self.layout, ranks=ranks)
        return self

    def finished(self, exit_code: int, step: int, **extra: Any) -> None:
        self.step = step
        if exit_code != 0 or extra.get("signal"):
            signals = _stop_signals(extra.get("signal"))
            if signals:
                extra["signals"] = signals
                if not extra.get("signal"):
                    extra["signal"] = min(signals, key=lambda name: signals[name]["ranks"][0])
        if self.rank0:
            record_exit(self.cfg.run_dir, "done" if exit_code == 0 else "preempted", exit_code, step, **extra)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.rank0:
            try:
                extra: Dict[str, Any] = {"error": f"{exc_type.__name__}: {exc}"[:2000]}
                step = self.step
                if self.trainer is not None:
                    step = getattr(self.trainer, "step", step)
                    from heptapod_ds.distributed.failures import collective_failure

                    if isinstance(exc, Exception) and collective_failure(exc) is not None:
                        ckpt = getattr(self.trainer, "ckpt", None)
                        newest = ckpt.latest() if ckpt is not None else None
                        # the step in progress failed; the run resumes from the newest complete checkpoint
                        extra.update(reason="collective", failed_step=None if step is None else step + 1,
                                     resume_from=str(newest) if newest is not None else None)
                record_exit(self.cfg.run_dir, "failed", 1, step, **extra)
            except OSError:
                pass  # the original error matters more than its record


def read_launches(run_dir: str) -> List[Dict[str, Any]]:
    with open(os.path.join(run_dir, LAUNCHES)) as fh:
        return [json.loads(line) for line in fh if line.strip()]
