"""Categorical output for discrete tokens: logits over the codebook, cross-entropy, and sampling.

The classifier is replicated across tensor-parallel ranks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .init import editable


class CategoricalOutput(nn.Module):
    def __init__(self, cond_dim: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, vocab_size)
        with editable(self.proj):
            nn.init.normal_(self.proj.weight, std=0.02)
            nn.init.zeros_(self.proj.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int,
                  generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    """Argmax when ``temperature`` == 0, otherwise sample softmax(logits / T) restricted to the top k.

    ``logits`` [B, V]; row i is drawn with ``generators[i]`` alone (one per image, so a draw does not
    depend on the row's batch-mates). ``generators=None`` uses the global RNG.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = argmax).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = no filter).")
    if generators is not None and len(generators) != logits.shape[0]:
        raise ValueError(f"need one generator per row: {len(generators)} generators for "
                         f"{logits.shape[0]} rows.")
    if temperature == 0:
        return logits.argmax(dim=-1)
    device = logits.device
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if device.type != "cpu":
        return _sample_on_device(probs, generators)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    rows = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def _sample_on_device(probs: torch.Tensor, generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    """Inverse-CDF draws on the probabilities' device: one uniform per row from the row's generator,
    sent to the device (host to device only, no round trip), searched in the row's cumulative sum.

    Rows keep their own generators (a row's draw does not depend on its batch-mates), but the draws differ
    from the CPU path's ``multinomial``: CPU runs keep that, and their samples, unchanged."""
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)  # torch's device RNG, no host step either
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g) for g in generators]) if generators \
        else torch.zeros(0, dtype=torch.float64)
    cdf = probs.double().cumsum(dim=-1)
    target = u.to(probs.device, non_blocking=True)[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)
