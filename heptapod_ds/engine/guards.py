"""Preemption and non-finite-loss handling, and the one training step that uses them.

Preemption: Slurm sends SIGTERM (at preemption / time limit, after ``KillWait``) or the signal
asked for with ``--signal=B:USR1@<seconds>``. The handler only sets a flag; the trainer asks
:meth:`PreemptionGuard.should_stop` once per step, which all-reduces the flag so every rank
stops after the same step, saves, and exits with :data:`REQUEUE_EXIT_CODE`.

``REQUEUE_EXIT_CODE = 75`` is ``EX_TEMPFAIL`` of sysexits.h ("temporary failure, try again").
Slurm requeues a job on it when the cluster lists it in ``RequeueExit=75`` (slurm.conf); the
sbatch templates also do it themselves: ``srun ...; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``.
On requeue the run resumes from the checkpoint with ``checkpoint.resume=auto``.
"""
from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75


def _all_reduce_max(value: float) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class PreemptionGuard:
    """Catch SIGTERM/SIGUSR1, let the step finish, agree across ranks to stop."""

    exit_code = REQUEUE_EXIT_CODE

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be created in the main thread (Python delivers signals "
                               "there).")
        self.received: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def signal_name(self) -> Optional[str]:
        return signal.Signals(self.received).name if self.received is not None else None

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (collective: call it on all ranks each step)."""
        return _all_reduce_max(1.0 if self.received is not None else 0.0) > 0

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

    A step is skipped when the loss of any micro batch on any rank is NaN/inf: no backward for it,
    no optimizer step, no scheduler step, no EMA update (see :func:`train_step`). ``max_in_a_row``
    consecutive skips make :attr:`should_stop` true; the trainer then saves and raises :meth:`error`.
    """

    def __init__(self, max_in_a_row: int):
        if max_in_a_row <= 0:
            raise ValueError(f"max_in_a_row (train.max_nonfinite) must be positive, got {max_in_a_row}.")
        self.max_in_a_row = int(max_in_a_row)
        self.in_a_row = 0
        self.total_skipped = 0

    def agree_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (collective)."""
        local_bad = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
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


@dataclass
class StepResult:
    loss: float          # mean loss over the global batch (NaN when skipped)
    skipped: bool        # the step was skipped for a non-finite loss
    lr: float            # learning rate the step used
    grad_norm: Optional[float]  # global gradient norm before clipping (None when skipped / unknown)


def train_step(engine, micro_batches: Sequence, loss_fn: Callable, nonfinite: NonFiniteGuard, ema=None
               ) -> StepResult:
    """One optimizer step over ``gradient_accumulation_steps`` micro batches, with non-finite skipping.

    ``loss_fn(engine, micro_batch) -> scalar mean loss``. Each micro batch's loss is checked on all
    ranks *before* its backward; a bad one abandons the step and discards the gradients already
    accumulated, leaving parameters, optimizer state, scheduler, EMA and DeepSpeed's counters as
    they were.
    """
    gas = engine.gradient_accumulation_steps()
    if len(micro_batches) != gas:
        raise ValueError(f"train_step got {len(micro_batches)} micro batches, DeepSpeed accumulates {gas} "
                         f"(train.grad_accum); pass exactly one optimizer step's worth.")
    lr = float(engine.get_lr()[0])
    counters = (engine.micro_steps, engine.global_samples)
    total = torch.zeros((), dtype=torch.float64)
    pre_step_norm = None
    for i, mb in enumerate(micro_batches):
        loss = loss_fn(engine, mb)
        if not nonfinite.agree_finite(loss):
            if i > 0:
                _discard_gradients(engine, counters)
            nonfinite.record(False)
            return StepResult(loss=math.nan, skipped=True, lr=lr, grad_norm=None)
        engine.backward(loss)
        if i == gas - 1 and engine.zero_optimization_stage() == 0:
            pre_step_norm = _zero0_grad_norm(engine)
        engine.step()
        total += loss.detach().double().cpu()
    nonfinite.record(True)
    if ema is not None:
        ema.update()
    mean = total / gas
    if dist.is_initialized():
        from heptapod_ds.distributed import parallel_state
        group = parallel_state.dp_group()
        t = mean.to(torch.float32)
        if dist.get_backend(group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, group=group)
        mean = t.cpu().double() / dist.get_world_size(group)
    norm = engine.get_global_grad_norm()
    if norm is None and engine.zero_optimization_stage() == 0:
        norm = pre_step_norm  # DeepSpeed's ZeRO-0 path computes the norm to clip but discards it
    return StepResult(loss=float(mean), skipped=False, lr=lr,
                      grad_norm=float(norm) if norm is not None else None)


def _zero0_grad_norm(engine) -> float:
    """Global gradient norm of the averaged gradients, TP-replicated parameters counted once."""
    from deepspeed.runtime.utils import clip_grad_norm_

    params = [p for p in engine.module.parameters() if p.grad is not None]
    return float(clip_grad_norm_(params, max_norm=float("inf"), mpu=engine.mpu))


def _discard_gradients(engine, counters) -> None:
    """Drop gradients accumulated by earlier micro batches of an abandoned step; rewind the counters."""
    stage = engine.zero_optimization_stage()
    opt = engine.optimizer
    if stage == 3:
        opt._overflow_clean_up(None)  # what ZeRO-3 does after an fp16 overflow: clear grad partitions
    elif stage in (1, 2):
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        for k in list(getattr(opt, "averaged_gradients", {}).keys()):
            opt.averaged_gradients[k] = None
        for k in list(getattr(opt, "all_grad_tensors", {}).keys()):
            opt.all_grad_tensors[k] = None
        if getattr(opt, "cpu_offload", False):
            opt.reset_cpu_buffers()
    engine.zero_grad()
    engine.micro_steps, engine.global_samples = counters
