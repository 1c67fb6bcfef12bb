"""Move weights between a full (TP=1) state dict and this rank's tensor-parallel shard.

Megatron marks every TP-sharded parameter with ``tensor_model_parallel=True`` and its split
dimension ``partition_dim``; shards are contiguous chunks in TP-rank order (QKV is laid out by
query group, so a contiguous split hands each rank whole heads). Everything else is replicated.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import nn


def _is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def _check_stride(name: str, p: torch.Tensor) -> None:
    if getattr(p, "partition_stride", 1) != 1:
        raise NotImplementedError(f"parameter '{name}' has partition_stride={p.partition_stride}; only "
                                  f"contiguous TP splits are supported.")


def split_full_state_dict(full_sd: Dict[str, torch.Tensor], model: nn.Module, tp_rank: int,
                          tp_size: int) -> Dict[str, torch.Tensor]:
    """This rank's shard of a full state dict, ready for ``model.load_state_dict``."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, {tp_size}).")
    params = dict(model.named_parameters())
    local_sd = model.state_dict()
    missing = [k for k in local_sd if k not in full_sd and not k.endswith("_extra_state")]
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} entries of the model, e.g. {missing[:3]}; "
                       f"was it saved from a model with a different config?")
    out = {}
    for name, local in local_sd.items():
        if name not in full_sd:
            out[name] = local
            continue
        full = full_sd[name]
        p = params.get(name)
        if p is not None and _is_sharded(p):
            _check_stride(name, p)
            dim = p.partition_dim
            if full.shape[dim] != local.shape[dim] * tp_size:
                raise ValueError(f"'{name}': full size {full.shape[dim]} along dim {dim} is not "
                                 f"{tp_size} x the local size {local.shape[dim]}.")
            full = full.chunk(tp_size, dim=dim)[tp_rank]
        if full.shape != local.shape:
            raise ValueError(f"'{name}': shape {tuple(full.shape)} does not match the model's "
                             f"{tuple(local.shape)}.")
        out[name] = full.clone()
    return out


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _tp_group():
    from megatron.core import parallel_state as mps
    return mps.get_tensor_model_parallel_group()


@torch.no_grad()
def gather_full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full (TP=1) state dict on every TP rank, on CPU (a collective over the TP group)."""
    params = dict(model.named_parameters())
    group = _tp_group()
    out = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        p = params.get(name)
        if p is not None and _is_sharded(p) and dist.get_world_size(group) > 1:
            _check_stride(name, p)
            t = _gather(t, p.partition_dim, group)
        out[name] = t.detach().cpu().clone()
    return out


@torch.no_grad()
def gather_full_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Gradients of every parameter, joined across TP ranks like :func:`gather_full_state_dict`."""
    group = _tp_group()
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if _is_sharded(p) and dist.get_world_size(group) > 1:
            g = _gather(g, p.partition_dim, group)
        out[name] = g.detach().cpu().clone()
    return out
