"""Collectives of the metrics: every tensor handed to torch.distributed lives on the collective's device.

NCCL only moves CUDA tensors (a host tensor fails, or worse, on the first GPU run); gloo moves host
tensors. :func:`collective_device` says which one a group needs, and the helpers copy there and back.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _world(group) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def collective_device(group=None) -> torch.device:
    """``cuda:<current>`` for an NCCL group, the host otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_equal(x: torch.Tensor, group=None) -> torch.Tensor:
    """``torch.cat`` over the ranks of ``group`` of ``x`` (the same shape on every rank), on ``x``'s device."""
    size = _world(group)
    if size == 1:
        return x
    dev = collective_device(group)
    y = x.contiguous().to(dev)
    parts = [torch.empty_like(y) for _ in range(size)]
    dist.all_gather(parts, y, group=group)
    return torch.cat(parts).to(x.device)


def gather_rows(x: torch.Tensor, group=None, dst: int = 0) -> Optional[torch.Tensor]:
    """Rows of every rank (any count per rank), concatenated in rank order on the group's rank ``dst``
    (returned on the host); ``None`` on the other ranks. Without torch.distributed: ``x`` itself."""
    size = _world(group)
    if size == 1:
        return x.cpu()
    dev = collective_device(group)
    counts = all_gather_equal(torch.tensor([x.shape[0]], dtype=torch.long), group).tolist()
    rows = max(counts)
    y = x.to(dev)
    padded = torch.cat([y, torch.zeros((rows - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=dev)])
    me = dist.get_rank(group)
    dst_global = dist.get_global_rank(group, dst) if group is not None else dst
    parts = [torch.empty_like(padded) for _ in range(size)] if me == dst else None
    dist.gather(padded, gather_list=parts, dst=dst_global, group=group)
    if me != dst:
        return None
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
