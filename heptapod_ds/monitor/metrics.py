"""Metrics sink: one JSON object per line in ``metrics.jsonl`` and, when enabled, wandb.

wandb runs offline when no API key is set (``WANDB_API_KEY`` or a netrc login) and is disabled
under pytest (``PYTEST_CURRENT_TEST``) or with ``logging.wandb_mode=disabled``. Only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional


def resolve_wandb_mode(mode: str) -> str:
    if "PYTEST_CURRENT_TEST" in os.environ or os.environ.get("HEPTAPOD_TESTING"):
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
    return "online" if has_key else "offline"


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsSink:
    """Append-only metrics: ``log(step, {...})``; reopened at ``resume_step`` it drops the lines logged after
    that step (the resumed run logs them again), so the file never holds two histories."""

    def __init__(self, path: Optional[str], enabled: bool = True, wandb_mode: str = "disabled",
                 wandb_project: str = "heptapod", run_name: Optional[str] = None,
                 config: Optional[Dict[str, Any]] = None, resume_step: int = 0):
        self.enabled = enabled
        self._fh = None
        self._wandb = None
        if not enabled:
            return
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if os.path.exists(path):  # a fresh start (step 0) in an old run directory starts a fresh file too
                _truncate_after(path, resume_step)
            self._fh = open(path, "a", buffering=1)
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            import wandb
            self._wandb = wandb.init(project=wandb_project, name=run_name, mode=mode, config=config,
                                     dir=os.path.dirname(os.path.abspath(path)) if path else None,
                                     resume="allow", id=run_name)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        if self._fh:
            self._fh.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=int(step))

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _truncate_after(path: str, step: int) -> None:
    """Drop lines logged after ``step``: a resumed run re-logs them, and must not duplicate them."""
    keep = []
    with open(path) as fh:
        for line in fh:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
    os.replace(tmp, path)


def read_metrics(path: str):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
