"""Test-only fault points: named places where the fault-injection tests kill the process.

A fault point does nothing unless ``HEPTAPOD_FAULT_POINT`` names it. Tests set, for example,
``HEPTAPOD_FAULT_POINT=save.meta@10`` (SIGKILL right after the meta file of checkpoint 10 is written)
or ``save.engine@10:rank1`` (only on global rank 1); ``HEPTAPOD_FAULT_SIGNAL=SIGTERM`` (or SIGUSR1,
SIGSTOP, ...) sends that signal instead of SIGKILL. Explicit points make a fault at an exact place of
the save sequence reproducible, where a timer would race the save.

Points (in the order a save passes them; ``@N`` is the checkpoint's step):
``save.begin`` staging directory made; ``save.engine`` DeepSpeed's files written; ``save.rank_file``
this rank's heptapod_rank file written; ``save.hashed`` every file hashed; ``save.meta`` meta file
written, tag not yet renamed into place; ``save.renamed`` renamed, ``latest`` not yet rewritten;
``save.prune`` an old checkpoint renamed to ``.trash-*``, not yet deleted.
Training: ``train.forward@N`` before each forward of step N (1-based), i.e. inside the step, before
its gradient reduction; ``train.step@N`` after optimizer step N completed (before the stop/save checks);
``eval.batch@I`` before sampling batch I of an evaluation.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

ENV = "HEPTAPOD_FAULT_POINT"
SIGNAL_ENV = "HEPTAPOD_FAULT_SIGNAL"


def _matches(spec: str, name: str, step: Optional[int], rank: int) -> bool:
    where, _, rank_part = spec.partition(":")
    point, _, at = where.partition("@")
    if point != name:
        return False
    if at and (step is None or int(at) != int(step)):
        return False
    if rank_part and int(rank_part.removeprefix("rank")) != rank:
        return False
    return True


def fault_point(name: str, step: Optional[int] = None) -> None:
    """Signal this process (SIGKILL by default) if ``HEPTAPOD_FAULT_POINT`` names this point, step and rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    rank = int(os.environ.get("RANK", "0"))
    if _matches(spec, name, step, rank):
        os.kill(os.getpid(), signal.Signals[os.environ.get(SIGNAL_ENV, "SIGKILL")])
