"""The training harness: loop, resumable data stream, throughput accounting, sampling during training."""
from .loop import Trainer

__all__ = ["Trainer"]
