"""Rank-0 logging, metrics sinks (JSONL + wandb) and progress bars."""
from .logger import get_logger, setup_logging
from .metrics import MetricsSink

__all__ = ["MetricsSink", "get_logger", "setup_logging"]
