"""The DeepSpeed training engine: config resolution, AdamW + schedule, EMA, checkpoints, guards."""
from . import ds_config, schedule
from .builder import build_engine
from .ema import EMA

__all__ = ["EMA", "build_engine", "ds_config", "schedule"]
