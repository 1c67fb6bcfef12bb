"""megatron's tensor-parallel linears with the bias folded into the matmul where there is nothing to parallelise.

At TP = 1 megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` still run their own autograd function
(a matmul, then the bias in a separate pass, or handed back to the caller to add: ``skip_bias_add``), where
``torch.nn.functional.linear`` adds the bias inside the matmul (one ``addmm``, and its backward sums the
bias gradient from the same buffer). Measured in the bench: that separate pass is what kept the full stack
behind the plain-PyTorch network at ZeRO-0 (BENCHMARKS.md). These subclasses call ``F.linear`` with the bias
whenever the layer is a plain dense linear (one TP rank, no sequence parallelism, no weight passed in, no
megatron gradient-accumulation fusion, wgrad deferral or activation offloading) and return no separate bias;
megatron's callers add a bias only when one is returned, so the layer computes the same function. Otherwise
they are megatron's. Parameter names, shapes and TP attributes are megatron's own (they are subclasses).
Under ZeRO-3, ``F.linear`` is DeepSpeed's (``memory_efficient_linear``) as for every other linear.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from torch.nn import functional as F


def _dense(layer) -> bool:
    group = getattr(layer, "tp_group", None)
    tp = group.size() if group is not None else 1
    cfg = layer.config
    return (tp == 1 and not layer.sequence_parallel and not layer.gradient_accumulation_fusion
            and not getattr(layer, "explicit_expert_comm", False)
            and not getattr(cfg, "defer_embedding_wgrad_compute", False)
            and getattr(cfg, "_cpu_offloading_context", None) is None)


class FoldedColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear``; at TP = 1 one ``F.linear`` with the bias."""

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if weight is None and self.weight is not None and _dense(self):
            return F.linear(input_, self.weight, self.bias), None
        return super().forward(input_, weight, runtime_gather_output)


class FoldedRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear``; at TP = 1 one ``F.linear`` with the bias."""

    def forward(self, input_: torch.Tensor):
        if _dense(self):
            return F.linear(input_, self.weight, self.bias), None
        return super().forward(input_)
