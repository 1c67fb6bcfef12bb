"""The DeepSpeed training engine: config resolution, AdamW + schedule, EMA, checkpoints, guards.

Typical use in a trainer::

    engine, optimizer, scheduler = build_engine(cfg, model_builder)
    ema = EMA(engine, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    ckpt, guard, nf = CheckpointManager(cfg), PreemptionGuard(), NonFiniteGuard(cfg.train.max_nonfinite)
    state = ckpt.load(engine, ema=ema)                 # None on a fresh start
    for step in range(start, cfg.train.steps):
        result = train_step(engine, micro_batches, loss_fn, nf, ema, pipeline=pp > 1)
        if nf.should_stop: ckpt.save(engine, step, state, ema); raise nf.error(step)
        if guard.should_stop(): ckpt.save(engine, step + 1, state, ema); sys.exit(guard.exit_code)
"""
from . import ds_config, schedule
from .builder import build_engine
from .checkpoint import CheckpointManager, CheckpointMismatch, CheckpointWriteError
from .integrity import CheckpointCorrupt, verify_checkpoint
from .ema import EMA
from .guards import REQUEUE_EXIT_CODE, NonFiniteGuard, NonFiniteLossError, Preempted, PreemptionGuard
from .step import StepResult, train_step

__all__ = ["CheckpointCorrupt", "CheckpointManager", "CheckpointMismatch", "CheckpointWriteError", "EMA",
           "NonFiniteGuard", "NonFiniteLossError", "Preempted", "PreemptionGuard", "REQUEUE_EXIT_CODE", "StepResult",
           "build_engine", "ds_config", "schedule", "train_step", "verify_checkpoint"]
