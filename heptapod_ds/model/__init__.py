"""The Heptapod model: build_model(cfg) -> HeptapodModel (call after heptapod_ds.distributed.initialize())."""
from __future__ import annotations

import torch

from .heptapod import HeptapodModel
from .layers import resolve_impl


def build_model(cfg, device=None) -> torch.nn.Module:
    """Build the fp32 model for this rank's TP shard, on ``device`` (default: the parallel state's device).

    With pipeline parallelism the result is this rank's :class:`heptapod_ds.pipeline.stage.PipelineStage`
    (parameter names as in the whole model).

    Replicated parameters (everything outside megatron's TP linears) are broadcast from TP rank 0 so
    TP peers start identical whatever the order of their RNG draws.
    """
    from heptapod_ds.distributed import parallel_state

    info = parallel_state.get_info()
    if info.tp_size != cfg.parallel.tensor:
        raise ValueError(f"cfg.parallel.tensor={cfg.parallel.tensor} but the parallel state was initialized "
                         f"with tensor={info.tp_size}; pass the same size to "
                         f"heptapod_ds.distributed.initialize().")
    if info.pp_size != cfg.parallel.pipeline:
        raise ValueError(f"cfg.parallel.pipeline={cfg.parallel.pipeline} but the parallel state was initialized "
                         f"with pipeline={info.pp_size}; pass the same size to "
                         f"heptapod_ds.distributed.initialize().")
    impl = resolve_impl(cfg.backbone.transformer_impl, cfg.backbone.attention)
    model = HeptapodModel(cfg, impl=impl, tensor_parallel=info.tp_size)
    if info.pp_size > 1:
        # the whole model was built (same weights as PP=1); keep this stage's part
        from heptapod_ds.pipeline.split import split_model
        from heptapod_ds.pipeline.stage import PipelineStage

        model = PipelineStage(model, split_model(cfg), info.pp_rank)
    model = model.to(device or info.device)
    if info.tp_size > 1:
        sync_replicated_params(model)
    return model


@torch.no_grad()
def sync_replicated_params(model: torch.nn.Module) -> None:
    """Broadcast every non-TP-sharded parameter from the first rank of the tensor-parallel group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    group = mps.get_tensor_model_parallel_group()
    src = dist.get_global_rank(group, 0)
    for p in model.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            dist.broadcast(p.data, src=src, group=group)


__all__ = ["HeptapodModel", "build_model", "sync_replicated_params"]
