"""Categorical output for discrete tokens: logits over the codebook, cross-entropy, and sampling.

The classifier is replicated across tensor-parallel ranks.
"""
from __future__ import annotations

from typing import Optional

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
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """Argmax when ``temperature`` == 0, otherwise sample softmax(logits / T) restricted to the top k."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = argmax).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = no filter).")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
