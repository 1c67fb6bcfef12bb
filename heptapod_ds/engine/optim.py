"""AdamW with decoupled weight decay, and the split of parameters into decay / no-decay groups.

No decay on norms, biases and embeddings: every parameter with at most one dimension (norm scales,
biases, scalar gates), every parameter of an ``nn.Embedding`` (or a megatron
``VocabParallelEmbedding``), and any name the model lists in ``model.no_weight_decay()``.
Shapes are read from ``ds_shape`` when present: under ZeRO-3's ``zero.Init`` a parameter's local
``shape`` is its (1-D) partition, not the parameter.
"""
from __future__ import annotations

from typing import Dict, List, Set, Tuple

import torch
from torch import nn


def _full_ndim(param: torch.Tensor) -> int:
    shape = getattr(param, "ds_shape", None)
    return len(shape) if shape is not None else param.dim()


def _embedding_param_names(model: nn.Module) -> Set[str]:
    names = set()
    embedding_types: Tuple[type, ...] = (nn.Embedding,)
    try:
        from megatron.core.tensor_parallel import VocabParallelEmbedding
        embedding_types += (VocabParallelEmbedding,)
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        pass
    for mod_name, module in model.named_modules():
        if isinstance(module, embedding_types):
            for p_name, _ in module.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def split_decay(model: nn.Module) -> Tuple[List[str], List[str]]:
    """(names with weight decay, names without) over the trainable parameters of ``model``."""
    skip = set(_embedding_param_names(model))
    if hasattr(model, "no_weight_decay"):
        listed = set(model.no_weight_decay())
        known = {n for n, _ in model.named_parameters()}
        unknown = sorted(listed - known)
        if unknown:
            raise ValueError(f"{type(model).__name__}.no_weight_decay() names parameters that do not exist: "
                             f"{unknown[:5]}; return names as given by model.named_parameters().")
        skip |= listed
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in skip or _full_ndim(param) <= 1 else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    """AdamW parameter groups; empty groups are dropped (DeepSpeed rejects them)."""
    decay, no_decay = split_decay(model)
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in decay], "weight_decay": weight_decay, "names": decay},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "names": no_decay}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters.")
    for g in groups:  # names are for inspection only; optimizers do not accept them
        g.pop("names")
    return groups


def build_optimizer(model: nn.Module, cfg, offload: bool) -> torch.optim.Optimizer:
    """torch AdamW (fused where supported), or DeepSpeedCPUAdam (AdamW mode) when ZeRO offloads the
    optimizer on a GPU run.

    A torch optimizer object avoids the FusedAdam build that DeepSpeed's config "AdamW" triggers.
    """
    opt = cfg.optimizer
    groups = param_groups(model, opt.weight_decay)
    kwargs = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, weight_decay=opt.weight_decay)
    if offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs, **fused_kwargs(groups))


def fused_kwargs(groups) -> Dict[str, bool]:
    """``fused=True`` (one kernel over all tensors) where torch supports it: floating parameters on CPU
    or CUDA. Measured on 2 CPU cores: 4x faster than the per-tensor loop and than ``foreach``."""
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return {"fused": True}
    return {}
