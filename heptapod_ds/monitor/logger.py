"""Logging that speaks on rank 0 only (other ranks log warnings and errors), with rank-tagged lines."""
from __future__ import annotations

import logging
import sys
import warnings

_FMT = "%(asctime)s [%(levelname)s] [rank %(rank)s] %(name)s: %(message)s"


def _rank() -> int:
    from heptapod_ds.distributed.launch_env import env_rank  # lazy: the package imports torch

    return env_rank()


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _rank()
        return True


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process; non-zero ranks only report warnings.

    The rank comes from the launcher's environment (``RANK``, or ``SLURM_PROCID`` under srun), so
    this may run before torch.distributed exists."""
    rank = _rank()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter(_FMT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    # DeepSpeed and torch repeat deprecation notices every step; they drown the training log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
