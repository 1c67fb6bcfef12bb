"""Feature statistics accumulated as float64 sums (count, sum x, sum x x^T), reducible across ranks.

Sums, unlike running means, add up in any order: each rank accumulates its own images, one
all-reduce gives the statistics of the whole run, and the result differs between rank counts only
by float64 rounding (~1e-15 relative).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch


class FeatureStats:
    """Running float64 sums of ``d``-dimensional features."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.sum = torch.zeros(self.dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def add(self, features) -> None:
        """Add a batch of features ``[n, d]`` (any float dtype; accumulated in float64)."""
        x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
        x = x.detach().to("cpu", torch.float64)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [n, {self.dim}], got {tuple(x.shape)}.")
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x

    def merge(self, other: "FeatureStats") -> None:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}.")
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer

    def all_reduce(self, group=None) -> None:
        """Sum the statistics of every rank of ``group`` (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum,
                          self.sum_outer.reshape(-1)]).to(device)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        self.count = int(round(float(flat[0])))
        self.sum = flat[1:1 + self.dim].clone()
        self.sum_outer = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()

    def mean_cov(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(mu, sigma)`` in float64; sigma is the unbiased covariance (as ``np.cov``)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}.")
        n = self.count
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), ((sigma + sigma.T) / 2).numpy()

    def state(self) -> dict:
        return {"count": np.int64(self.count), "sum": self.sum.numpy(), "sum_outer": self.sum_outer.numpy()}

    @classmethod
    def from_state(cls, state, dim: Optional[int] = None) -> "FeatureStats":
        s = cls(int(np.asarray(state["sum"]).shape[0]))
        if dim is not None and s.dim != dim:
            raise ValueError(f"stored statistics have dimension {s.dim}, expected {dim}.")
        s.count = int(state["count"])
        s.sum = torch.from_numpy(np.asarray(state["sum"], dtype=np.float64).copy())
        s.sum_outer = torch.from_numpy(np.asarray(state["sum_outer"], dtype=np.float64).copy())
        return s
