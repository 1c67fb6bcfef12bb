"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio * lr`` or constant.

:func:`lr_at` is the one definition; :func:`build_scheduler` wraps it in a ``LambdaLR`` whose
state (the number of optimizer steps taken) DeepSpeed saves and restores with each checkpoint.
A skipped step (non-finite loss) does not advance it.
"""
from __future__ import annotations

import math

import torch


def lr_at(step: int, cfg) -> float:
    """Learning rate of optimizer step ``step`` (0-based: the first update uses ``lr_at(0)``)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak = cfg.optimizer.lr
    sched = cfg.schedule
    warmup = sched.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if sched.decay == "constant":
        return peak
    if sched.decay != "cosine":
        raise ValueError(f"schedule.decay='{sched.decay}' is not one of cosine, constant.")
    decay_steps = max(1, cfg.train.steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = sched.min_lr_ratio
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def check(cfg) -> None:
    """Reject schedule settings that cannot work, with the fix."""
    sched = cfg.schedule
    if sched.warmup_steps < 0:
        raise ValueError(f"schedule.warmup_steps={sched.warmup_steps} must be >= 0.")
    if not 0.0 <= sched.min_lr_ratio <= 1.0:
        raise ValueError(f"schedule.min_lr_ratio={sched.min_lr_ratio} must be in [0, 1].")
    if cfg.optimizer.lr <= 0:
        raise ValueError(f"optimizer.lr={cfg.optimizer.lr} must be positive.")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_at`; every param group's ``lr`` must equal ``optimizer.lr``."""
    check(cfg)
    peak = cfg.optimizer.lr
    for group in optimizer.param_groups:
        group["lr"] = peak
        group["initial_lr"] = peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / peak)
