"""Inception Score from classifier logits, accumulated as per-split float64 sums.

IS = exp(mean over images of KL(p(y|x) || p(y))), averaged over ``splits`` disjoint parts of the run
(10 in the published tables). Per split the mean KL equals
``mean_x sum_y p log p  -  sum_y pbar log pbar`` with ``pbar`` the split's mean of ``p(y|x)``, so it
needs only the sums ``count``, ``sum_x p(y|x)`` and ``sum_x sum_y p log p``: each rank adds its images
to the split their *global index* falls in, and one all-reduce gives the score of the whole run on
any number of ranks. ADM's evaluator and torch-fidelity feed the logits without the classifier's
bias; the extractors here do the same.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


def split_of(indices, total: int, splits: int) -> np.ndarray:
    """Split of each global image index: contiguous, near-equal parts of ``range(total)``."""
    idx = np.asarray(indices, dtype=np.int64)
    return (idx * splits) // total


class InceptionScoreStats:
    def __init__(self, num_classes: int, total: int, splits: int = 10):
        if total < splits:
            raise ValueError(f"the Inception Score over {splits} splits needs >= {splits} images, got {total}.")
        self.num_classes, self.total, self.splits = int(num_classes), int(total), int(splits)
        self.count = torch.zeros(splits, dtype=torch.float64)
        self.sum_p = torch.zeros(splits, num_classes, dtype=torch.float64)
        self.sum_plogp = torch.zeros(splits, dtype=torch.float64)

    def add(self, logits, indices) -> None:
        """Add ``logits`` [n, classes] of the images with global indices ``indices`` [n]."""
        z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
        if z.dim() != 2 or z.shape[1] != self.num_classes:
            raise ValueError(f"logits must be [n, {self.num_classes}], got {tuple(z.shape)}.")
        split = torch.from_numpy(split_of(indices, self.total, self.splits))
        if split.shape[0] != z.shape[0]:
            raise ValueError(f"{split.shape[0]} indices for {z.shape[0]} logits.")
        logp = torch.log_softmax(z, dim=1)
        p = logp.exp()
        self.count.index_add_(0, split, torch.ones(len(split), dtype=torch.float64))
        self.sum_p.index_add_(0, split, p)
        self.sum_plogp.index_add_(0, split, (p * logp).sum(1))

    def all_reduce(self, group=None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flat = torch.cat([self.count, self.sum_p.reshape(-1), self.sum_plogp]).to(device)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        s, k = self.splits, self.num_classes
        self.count, self.sum_p, self.sum_plogp = flat[:s].clone(), flat[s:s + s * k].reshape(s, k).clone(), \
            flat[s + s * k:].clone()

    def score(self) -> Tuple[float, float]:
        """(mean, std) of the per-split scores."""
        if (self.count == 0).any():
            raise ValueError(f"some Inception Score splits are empty (counts {self.count.tolist()}).")
        pbar = self.sum_p / self.count[:, None]
        kl = self.sum_plogp / self.count - torch.special.xlogy(pbar, pbar).sum(1)
        scores = kl.exp().numpy()
        return float(scores.mean()), float(scores.std())


def inception_score(logits, splits: int = 10, indices: Optional[np.ndarray] = None) -> Tuple[float, float]:
    """Inception Score (mean, std) of all ``logits`` at once."""
    logits = np.asarray(logits)
    acc = InceptionScoreStats(logits.shape[1], len(logits), splits)
    acc.add(logits, np.arange(len(logits)) if indices is None else indices)
    return acc.score()
