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
    probs = torch.softmax(logits, dim=-1).cpu()
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1).to(device)
    rows = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.long, device=device)
