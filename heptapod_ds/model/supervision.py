"""Which (timestep, position) pairs are supervised in a training step ("supervision density").

Per image: T distinct timesteps t drawn uniformly from 0..N-1; at each, K positions drawn among the
allowed remaining slots j (global: t < j <= N; local: t < j <= min(t+W, N)), the next slot t+1
always among them (K = 0: all allowed). The ``next`` head supervises every slot j = t+1.

Every draw of image i is a function of the seed of ``generators[i]`` (None = a key drawn from torch's
global RNG), so a sample's targets do not depend on the batch it is in; the draws are vectorised
over the batch (:mod:`.counter_rng`), no Python loop per image or timestep.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .counter_rng import bits, keys_from_generators


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


_LANE_TIMESTEPS, _LANE_SLOTS = 0x74696D65, 0x736C6F74  # "time", "slot"


def draw_plan(generators: Sequence[Optional[torch.Generator]], num_tokens: int, timesteps: int,
              supervised: int, window: Optional[int]) -> SupervisionPlan:
    """The plan of a batch, drawn for all images at once.

    Image i's draws are counter-based random numbers of its generator's seed
    (:mod:`.counter_rng`), so they depend on that seed alone; the generators themselves are not
    advanced. Timesteps: the T smallest of N random keys; positions: among the allowed slots
    ``t+2 .. t+n`` the ``m-1`` with the smallest keys, plus ``t+1``.
    """
    batch, n_tok = len(generators), num_tokens
    if batch == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return SupervisionPlan(torch.zeros(0, timesteps, dtype=torch.long), empty, empty, empty, empty)
    keys = keys_from_generators(generators)
    # timesteps: a uniform T-subset of 0..N-1 per image
    tkeys = bits(keys[:, None], _LANE_TIMESTEPS, np.arange(n_tok, dtype=np.uint64)[None])       # [B, N]
    ts = np.sort(np.argsort(tkeys, axis=1, kind="stable")[:, :timesteps], axis=1)                # [B, T]
    # positions: slot j in 1..N is allowed at timestep t when t < j <= t + n(t)
    t = ts[:, :, None]
    allowed = n_tok - t if window is None else np.minimum(window, n_tok - t)                   # [B, T, 1]
    chosen_count = allowed if supervised == 0 else np.minimum(supervised, allowed)
    j = np.arange(1, n_tok + 1)[None, None, :]                                                # [1, 1, N]
    others = (j >= t + 2) & (j <= t + allowed)                                                 # [B, T, N]
    counters = (np.arange(timesteps)[:, None] * n_tok + np.arange(n_tok)[None]).astype(np.uint64)
    skeys = bits(keys[:, None, None], _LANE_SLOTS, counters[None]) >> np.uint64(1)            # [B, T, N]
    skeys = np.where(others, skeys, np.uint64(0xFFFFFFFFFFFFFFFF))
    order = np.argsort(skeys, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(n_tok), order.shape), axis=-1)
    chosen = (others & (rank < chosen_count - 1)) | (j == t + 1)                               # [B, T, N]
    b_idx, k_idx, j_idx = np.nonzero(chosen)  # row-major: grouped by image, then timestep, slots ascending
    return SupervisionPlan(timesteps=torch.from_numpy(ts.astype(np.int64)),
                           rows=torch.from_numpy((b_idx * timesteps + k_idx).astype(np.int64)),
                           slots=torch.from_numpy((j_idx + 1).astype(np.int64)),
                           sample=torch.from_numpy(b_idx.astype(np.int64)),
                           counts=torch.from_numpy(chosen.sum(axis=(1, 2)).astype(np.int64)))


def next_token_plan(batch: int, num_tokens: int) -> SupervisionPlan:
    """The 1D baseline: every o_t (t = 0..N-1) predicts x_{t+1}; ``rows`` index o_t in [B*N]."""
    t = torch.arange(num_tokens)
    return SupervisionPlan(timesteps=t.expand(batch, num_tokens), rows=torch.arange(batch * num_tokens),
                           slots=(t + 1).repeat(batch),
                           sample=torch.arange(batch).repeat_interleave(num_tokens),
                           counts=torch.full((batch,), num_tokens, dtype=torch.long))
