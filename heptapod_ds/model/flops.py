"""Parameter counts and training FLOPs per image of a Heptapod config.

``param_counts`` builds the model on the meta device (no memory) and counts the *full* model:
TP-sharded tensors count ``tp_size`` times. ``train_flops_per_image`` is analytic: multiply-adds of
every matmul count 2 FLOPs, attention scores and values are counted over the full (unmasked)
sequence the kernels compute, and training = 3 x forward (backward costs two forwards). Norms,
activations and softmax are left out (a few percent). The head runs T sequences of N + 1 slots per
image; the output (diffusion MLP x batch_mul, or the classifier) runs on the expected number of
supervised targets per image.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch

from .supervision import expected_targets_per_image


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


def _layer_flops(tokens: int, seq: int, width: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre-norm Transformer layer over ``tokens`` tokens in sequences of ``seq``."""
    ffn = int(width * mlp_ratio)
    dense = 2 * (4 * width * width + 2 * width * ffn)
    attention = 2 * 2 * seq * width
    return tokens * (dense + attention)


def _denoiser_flops(channels: int, cond: int, width: int, depth: int, freq_dim: int = 256) -> float:
    per_token = (channels * width + freq_dim * width + width * width + cond * width
                 + depth * (2 * width * width + 3 * width * width) + 2 * width * width + width * channels)
    return 2 * per_token


def chain_flops(cfg) -> List[Tuple[str, float]]:
    """Forward FLOPs per image of every link of the model's chain, in order.

    Links: ``embed`` (class/token embeddings; the latent projection for continuous tokens),
    ``backbone.i`` (one causal layer each), ``head_input`` (projection, mask token, 2D positions, one
    copy per drawn timestep), ``head.j`` (one head layer each), ``output`` (per-token output + loss).
    The pipeline split (:mod:`heptapod_ds.pipeline.split`) balances stages with these numbers, and
    :func:`forward_flops_per_image` sums them, so both use one accounting.
    """
    tok, bb, head, diff = cfg.tokenizer, cfg.backbone, cfg.head, cfg.diffusion
    n = tok.num_tokens
    links: List[Tuple[str, float]] = [("embed", 0.0 if tok.is_discrete else 2.0 * tok.channels * bb.width * n)]
    links += [(f"backbone.{i}", float(_layer_flops(n, n, bb.width, bb.mlp_ratio))) for i in range(bb.depth)]
    if head.type == "next":
        targets, cond = float(n), bb.width
    else:
        window = head.window if head.type == "local" else None
        slots = head.timesteps * (n + 1)
        links.append(("head_input", float(2 * bb.width * head.width * n)))
        links += [(f"head.{j}", float(_layer_flops(slots, n + 1, head.width, head.mlp_ratio)))
                  for j in range(head.depth)]
        targets, cond = expected_targets_per_image(n, head.timesteps, head.supervised, window), head.width
    if tok.is_discrete:
        output = 2 * cond * tok.vocab_size * targets
    else:
        output = diff.batch_mul * targets * _denoiser_flops(tok.channels, cond, diff.width, diff.depth)
    links.append(("output", float(output)))
    return links


def forward_flops_per_image(cfg) -> Dict[str, float]:
    """{"backbone", "head", "diffusion"}: sums of :func:`chain_flops` (embed counts to the backbone)."""
    out = {"backbone": 0.0, "head": 0.0, "diffusion": 0.0}
    for name, flops in chain_flops(cfg):
        if name == "output":
            out["diffusion"] += flops
        elif name == "head_input" or name.startswith("head."):
            out["head"] += flops
        else:
            out["backbone"] += flops
    return out


def train_flops_per_image(cfg) -> int:
    """Training FLOPs (forward + backward) per image: backbone + head + diffusion MLP / classifier."""
    return int(round(3 * sum(forward_flops_per_image(cfg).values())))
