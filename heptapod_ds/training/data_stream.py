"""An endless, resumable stream of micro-batches over epochs.

The position is (epoch, micro_step): how many micro-batches of ``epoch`` this rank has consumed.
Since the loader's order and noise are functions of (data seed, epoch, sample index) only, storing
this pair in a checkpoint is enough to continue with exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

# Odd multipliers keep (seed, epoch, index) -> seed one-to-one for any realistic ranges.
_EPOCH_MUL = 1_000_003
_SEED_MUL = 2_147_483_647


def sample_seeds(seed: int, epoch: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample seeds for the model's random draws: independent of rank, micro-batch and DP size."""
    base = (seed * _SEED_MUL + epoch * _EPOCH_MUL) % (2**62)
    return (sample_ids.to(torch.int64) + base) % (2**62)


class BatchStream:
    def __init__(self, cfg, dp_rank: int, dp_size: int, epoch: int = 0, micro_step: int = 0):
        from heptapod_ds.data import build_train_loader

        self.loader = build_train_loader(cfg, dp_rank, dp_size, start_epoch=epoch, start_step=micro_step)
        self.epoch = epoch
        self.micro_step = micro_step
        self._it: Optional[Iterator] = None

    def _open(self) -> None:
        self.loader.set_epoch(self.epoch, self.micro_step)
        self._it = iter(self.loader)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(tokens, labels, sample_ids, epoch of this batch)."""
        if self._it is None:
            self._open()
        try:
            tokens, labels, ids = next(self._it)
        except StopIteration:
            self.epoch += 1
            self.micro_step = 0
            self._open()
            tokens, labels, ids = next(self._it)
        self.micro_step += 1
        return tokens, labels, ids, self.epoch

    def position(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "micro_step": self.micro_step}
