"""An endless, resumable stream of micro-batches over epochs.

The saved position is layout-independent: ``{"epoch", "global_batches", "global_batch_size"}``, the
number of *global* batches of ``epoch`` consumed by the whole data-parallel group. The loader's order
and noise are functions of (data seed, epoch, sample index) and global batch s of an epoch always
covers the same samples whatever the data-parallel size (see :mod:`heptapod_ds.data.order`), so a
run resumed with another DP size, micro batch or accumulation sees exactly the samples an
uninterrupted run would have seen. Internally each rank counts its own micro-batches.
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
        """Layout-independent position; see the module docstring."""
        accum = self.loader.grad_accum
        if self.micro_step % accum:
            raise RuntimeError(f"data position taken in the middle of an optimizer step (micro step "
                               f"{self.micro_step}, grad_accum {accum}); save only between steps.")
        return {"epoch": self.epoch, "global_batches": self.micro_step // accum,
                "global_batch_size": self.loader.global_batch}


def resume_micro_step(position: Dict[str, int], cfg) -> Dict[str, int]:
    """(epoch, micro_step) of this run's rank stream for a saved ``position``.

    Accepts the layout-independent form and the per-rank form of older checkpoints
    (``micro_step``, valid only for the same grad_accum). A changed global batch size is refused: the
    samples of global batch s would differ from the uninterrupted run's.
    """
    epoch = int(position["epoch"])
    if "global_batches" in position:
        saved = int(position.get("global_batch_size", cfg.train.global_batch_size))
        if saved != cfg.train.global_batch_size:
            raise ValueError(f"the checkpoint was trained with train.global_batch_size={saved}, this run has "
                             f"{cfg.train.global_batch_size}; a resumed run must keep the global batch size "
                             f"to see the samples an uninterrupted run would see (set "
                             f"train.global_batch_size={saved}).")
        return {"epoch": epoch, "micro_step": int(position["global_batches"]) * cfg.train.grad_accum}
    return {"epoch": epoch, "micro_step": int(position["micro_step"])}
