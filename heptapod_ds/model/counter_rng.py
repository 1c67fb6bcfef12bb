"""Counter-based per-sample random numbers: value = SplitMix64(key of the sample, lane, counter).

Why: the training step draws a few numbers per (image, timestep, position). Reseeding a
``torch.Generator`` per image and drawing in a Python loop costs milliseconds per step; hashing
(key, counter) pairs is one vectorised numpy expression over the whole batch, and every number
still depends only on its image's seed (not on the batch, its order or the rank count).

Keys come from the per-sample seeds; a *lane* separates independent uses (timesteps, positions,
label dropout) so that they never share numbers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al.) on uint64 arrays, wrapping arithmetic."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def seed_keys(seeds: Sequence[int]) -> np.ndarray:
    """uint64 key per sample seed (any Python int; negative seeds wrap)."""
    return splitmix64(np.array([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64))


def keys_from_generators(generators: Sequence[Optional[torch.Generator]]) -> np.ndarray:
    """Keys of per-sample generators (their seeds); ``None`` entries draw a key from torch's global RNG."""
    seeds = [None if g is None else g.initial_seed() for g in generators]
    missing = [i for i, s in enumerate(seeds) if s is None]
    if missing:
        drawn = torch.randint(0, 2 ** 62, (len(missing),)).tolist()
        for i, s in zip(missing, drawn):
            seeds[i] = s
    return seed_keys(seeds)


def bits(keys: np.ndarray, lane: int, counters: np.ndarray) -> np.ndarray:
    """64 random bits per element: SplitMix64 stream ``lane`` of each key at position ``counter``.

    ``keys`` and ``counters`` broadcast against each other.
    """
    with np.errstate(over="ignore"):
        stream = splitmix64(np.asarray(keys, dtype=np.uint64) ^ np.uint64(lane & 0xFFFFFFFFFFFFFFFF))
        return splitmix64(stream + np.asarray(counters, dtype=np.uint64) * _GOLDEN)


def uniform(keys: np.ndarray, lane: int, counters: np.ndarray) -> np.ndarray:
    """float64 in [0, 1) per element (53 random bits)."""
    return (bits(keys, lane, counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
