"""Shared helpers of the model tests: tiny configs and digit tokens made directly from sklearn."""
from __future__ import annotations

import torch

from heptapod_ds.config.loader import load_config

HEAD_TYPES = ("global", "local", "next")
TOKEN_KINDS = ("discrete", "continuous")


def tiny_cfg(kind: str = "discrete", head: str = "global", tensor: int = 1, world_size: int = 1, **extra):
    """The tiny preset, shrunk further so CPU tests are fast (8x8 grid, width 32)."""
    tok = ["tokenizer.name=pixel"] if kind == "discrete" else ["tokenizer.name=patch", "tokenizer.channels=1"]
    overrides = tok + [f"head.type={head}", "head.window=6", "head.timesteps=3", "head.supervised=5",
                       "backbone.depth=2", "backbone.width=32", "backbone.num_heads=4",
                       "head.depth=2", "head.width=32", "head.num_heads=4",
                       "diffusion.depth=2", "diffusion.width=32", "diffusion.batch_mul=2",
                       f"parallel.tensor={tensor}", "train.global_batch_size=8", "train.micro_batch_size=8"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(overrides=overrides, world_size=world_size)


def digits(count: int = 8):
    """(pixel tokens long [B, 64] in 0..16, patch tokens float [B, 64, 1] in [-1, 1], labels long [B])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = torch.as_tensor(d.data[:count], dtype=torch.long)
    labels = torch.as_tensor(d.target[:count], dtype=torch.long)
    return pixels, (pixels.float() / 16 * 2 - 1)[..., None], labels


def random_tokens(kind: str, batch: int, cfg, generator=None):
    n = cfg.tokenizer.num_tokens
    if kind == "discrete":
        return torch.randint(0, cfg.tokenizer.vocab_size, (batch, n), generator=generator)
    return torch.randn(batch, n, cfg.tokenizer.channels, generator=generator)


@torch.no_grad()
def randomize_zero_params(model, seed: int = 0) -> None:
    """Give zero-initialized tensors (adaLN gates, diffusion output) random values so every gradient flows."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.ndim >= 1 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
