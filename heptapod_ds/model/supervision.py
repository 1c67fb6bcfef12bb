"""Which (timestep, position) pairs are supervised in a training step ("supervision density").

Per image: T distinct timesteps t drawn uniformly from 0..N-1; at each, K positions drawn among the
allowed remaining slots j (global: t < j <= N; local: t < j <= min(t+W, N)), the next slot t+1
always among them (K = 0: all allowed). The ``next`` head supervises every slot j = t+1.

Every draw of image i comes from ``generators[i]`` (None = torch's global RNG), so a sample's
targets do not depend on the batch it is in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class SupervisionPlan:
    timesteps: torch.Tensor   # long [B, T]: head timesteps per image, sorted
    rows: torch.Tensor        # long [S]: index into the B*T head sequences (b * T + k)
    slots: torch.Tensor       # long [S]: slot j of the target token x_j (token index j - 1)
    sample: torch.Tensor      # long [S]: image of each target; targets are grouped by image
    counts: torch.Tensor      # long [B]: targets per image


def allowed_count(t: int, num_tokens: int, window: Optional[int]) -> int:
    """Number of remaining slots the head may supervise at timestep t."""
    remaining = num_tokens - t
    return remaining if window is None else min(window, remaining)


def supervised_count(t: int, num_tokens: int, supervised: int, window: Optional[int]) -> int:
    n = allowed_count(t, num_tokens, window)
    return n if supervised == 0 else min(supervised, n)


def expected_targets_per_image(num_tokens: int, timesteps: int, supervised: int,
                               window: Optional[int]) -> float:
    """Mean number of supervised targets per image (timesteps uniform over 0..N-1)."""
    mean = sum(supervised_count(t, num_tokens, supervised, window) for t in range(num_tokens)) / num_tokens
    return timesteps * mean


def draw_plan(generators: Sequence[Optional[torch.Generator]], num_tokens: int, timesteps: int,
              supervised: int, window: Optional[int]) -> SupervisionPlan:
    ts_all: List[torch.Tensor] = []
    rows, slots, sample, counts = [], [], [], []
    for b, gen in enumerate(generators):
        ts = torch.randperm(num_tokens, generator=gen)[:timesteps].sort().values
        ts_all.append(ts)
        count = 0
        for k, t in enumerate(ts.tolist()):
            n = allowed_count(t, num_tokens, window)
            m = supervised_count(t, num_tokens, supervised, window)
            others = torch.randperm(n - 1, generator=gen)[:m - 1] + t + 2
            chosen = torch.cat([torch.tensor([t + 1]), others.sort().values])
            slots.append(chosen)
            rows.append(torch.full((m,), b * timesteps + k, dtype=torch.long))
            count += m
        sample.append(torch.full((count,), b, dtype=torch.long))
        counts.append(count)
    return SupervisionPlan(timesteps=torch.stack(ts_all), rows=torch.cat(rows), slots=torch.cat(slots),
                           sample=torch.cat(sample), counts=torch.tensor(counts, dtype=torch.long))


def next_token_plan(batch: int, num_tokens: int) -> SupervisionPlan:
    """The 1D baseline: every o_t (t = 0..N-1) predicts x_{t+1}; ``rows`` index o_t in [B*N]."""
    t = torch.arange(num_tokens)
    return SupervisionPlan(timesteps=t.expand(batch, num_tokens), rows=torch.arange(batch * num_tokens),
                           slots=(t + 1).repeat(batch),
                           sample=torch.arange(batch).repeat_interleave(num_tokens),
                           counts=torch.full((batch,), num_tokens, dtype=torch.long))
