"""Parameter counts of a built model and the FLOPs accounting (moved to :mod:`heptapod_ds.cost.flops`).

The FLOPs live in the cost model, which imports no model code; they are re-exported here for old
callers. ``param_counts`` builds the model on the meta device (no memory) and counts the *full* model
(TP-sharded tensors count ``tp_size`` times): the check of the analytic
:func:`heptapod_ds.cost.flops.param_totals`.
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch

from heptapod_ds.cost.flops import (_denoiser_flops, _layer_flops, chain_flops,  # noqa: F401 - re-exports
                                    forward_flops_per_image, train_flops_per_image)


@contextlib.contextmanager
def _parallel_state_for_counting():
    """Megatron layers need its groups; borrow the live ones or open a private 1-rank world."""
    from heptapod_ds.distributed import parallel_state

    if parallel_state.is_initialized():
        yield parallel_state.get_info().tp_size
        return
    from heptapod_ds.distributed.launch_env import LaunchEnv, free_port

    env = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                    launcher="single")
    parallel_state.initialize(tensor=1, pipeline=1, backend="gloo", seed=0, launch=env)
    try:
        yield 1
    finally:
        parallel_state.destroy()


def param_counts(cfg) -> Dict[str, int]:
    """{"backbone", "head", "diffusion", "total"}; "diffusion" is the per-token output module
    (the diffusion MLP for continuous tokens, the classifier for discrete ones)."""
    from .heptapod import HeptapodModel
    from .layers import count_tp_aware

    with _parallel_state_for_counting() as tp, torch.device("meta"):
        model = HeptapodModel(cfg, impl="local", tensor_parallel=tp)
    counts = {"backbone": count_tp_aware(model.backbone, tp),
              "head": count_tp_aware(model.head, tp) if model.head is not None else 0,
              "diffusion": count_tp_aware(model.output, tp)}
    counts["total"] = sum(counts.values())
    return counts
