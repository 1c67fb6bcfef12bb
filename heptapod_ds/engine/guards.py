"""Preemption and non-finite-loss handling (the optimizer step that uses them: :mod:`.step`).

Preemption: the trainer stops cleanly on SIGTERM or SIGUSR1. The handler only sets a flag; the
trainer asks :meth:`PreemptionGuard.should_stop` once per step, which all-reduces the flag so every
rank stops after the same step, saves, and exits with :data:`REQUEUE_EXIT_CODE`. Under NCCL that vote
runs over a gloo group of its own (host flags, no GPU round trip).

Which signal reaches the trainer under Slurm:

- ``#SBATCH --signal=USR1@600`` (what ``slurm/train_*.sh`` use): SIGUSR1 to every task of the job
  steps (the trainer ranks) 600 s before the time limit; the batch shell is not signalled. 600 s
  leaves time to finish a step and write a checkpoint of a large model. ``scancel --signal=USR1 JOB``
  does the same at any time (a manual preemption).
- ``--signal=B:USR1@600`` signals *only the batch shell*, never the trainer: it needs a batch script
  that forwards the signal (``slurm/_launch.sh`` does: it passes SIGUSR1 on to srun's tasks).
- SIGTERM: sent by Slurm to every process of the job (batch shell included) on ``scancel``, on a
  preemption and at the time limit, then SIGKILL after the cluster's ``KillWait`` (often 30 s). The
  trainer saves if the step and the save fit into that window. The batch script does not requeue a
  job it saw SIGTERM for (a cancelled job must stay cancelled; a scheduler preemption with
  ``PreemptMode=REQUEUE`` is requeued by Slurm itself).

``REQUEUE_EXIT_CODE = 75`` is ``EX_TEMPFAIL`` of sysexits.h ("temporary failure, try again"). The
templates requeue the job themselves: rank 0 writes an exit record with status ``preempted`` after
the checkpoint is complete (:mod:`heptapod_ds.monitor.provenance`) and ``slurm/_train.sh`` runs
``scontrol requeue $SLURM_JOB_ID`` on it. On requeue the run resumes from the checkpoint with
``checkpoint.resume=auto``. Clusters that list ``RequeueExit=75`` in slurm.conf requeue on the status
alone.
"""
from __future__ import annotations

import math
import signal
import threading
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75


def _all_reduce_max(value: float, group=None) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float32)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def host_group():
    """A gloo group over every rank, for flags that live on the host (the preemption vote): under NCCL an
    all-reduce of them would go through the GPU and read back, a wait for the stream every step. None
    when the world group is already host-side (gloo) or there is no world. Collective: every rank calls it
    at the same point (:class:`PreemptionGuard` does, in its constructor)."""
    if not dist.is_initialized() or dist.get_backend() != "nccl":
        return None
    return dist.new_group(backend="gloo")


class Preempted(Exception):
    """Raised by :meth:`PreemptionGuard.check` inside long non-step work (sampling) to unwind it."""


class PreemptionGuard:
    """Catch SIGTERM/SIGUSR1, let the step finish, agree across ranks to stop."""

    exit_code = REQUEUE_EXIT_CODE

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be created in the main thread (Python delivers signals "
                               "there).")
        self.received: Optional[int] = None
        self._group = host_group()
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self.received).name if self.received is not None else None

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (collective: call it on all ranks each step; over a
        host group, so on GPUs it does not wait for the device)."""
        return _all_reduce_max(1.0 if self.received is not None else 0.0, self._group) > 0

    def check(self, where: str) -> None:
        """Raise :class:`Preempted` on every rank once any rank got a signal (collective, like should_stop)."""
        if self.should_stop():
            raise Preempted(f"{self.signal_name or 'a preemption signal'} received during {where}")

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the run stops with the last good state saved."""


class NonFiniteGuard:
    """Decide skip / stop for non-finite losses, the same way on all ranks.

    A step is skipped when the loss of any micro batch on any rank is NaN/inf: no optimizer step, no
    scheduler step, no EMA update (see :func:`heptapod_ds.engine.step.train_step`). ``max_in_a_row``
    consecutive skips make :attr:`should_stop` true; the trainer then saves and raises :meth:`error`.
    """

    def __init__(self, max_in_a_row: int):
        if max_in_a_row <= 0:
            raise ValueError(f"max_in_a_row (train.max_nonfinite) must be positive, got {max_in_a_row}.")
        self.max_in_a_row = int(max_in_a_row)
        self.in_a_row = 0
        self.total_skipped = 0

    def agree_finite(self, loss: Optional[torch.Tensor]) -> bool:
        """Whether the loss is finite on every rank (collective). ``None``: this rank measured no loss
        (a pipeline stage before the last) and only joins the vote. Reads the loss on the host: the
        training step does not call it (it votes once per step on the device, :mod:`.step`)."""
        local_bad = 0.0 if loss is None or bool(torch.isfinite(loss.detach()).all()) else 1.0
        return _all_reduce_max(local_bad) == 0.0

    def record(self, finite: bool) -> None:
        if finite:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.total_skipped += 1

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def error(self, step: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"{self.in_a_row} non-finite losses in a row at step {step} (train.max_nonfinite="
            f"{self.max_in_a_row}; {self.total_skipped} skipped in total). The last good state was saved; "
            f"lower optimizer.lr, check the data, or raise train.max_nonfinite.")

    def state_dict(self) -> Dict[str, int]:
        return {"in_a_row": self.in_a_row, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.in_a_row = int(state["in_a_row"])
        self.total_skipped = int(state["total_skipped"])
