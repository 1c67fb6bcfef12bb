"""The one rule that gives every image of a sampling run its seed: ``image_seeds(global_seed, indices)``.

Image ``i`` of a run is a function of ``(global_seed, i)`` only, so a run gives the same images on any
number of ranks, with any batch size, with or without the KV cache. Every sampler (in-training
evaluation, tools/sample_fid.py, pipelined generation) must take its seeds from here.

The seed is a SplitMix64 hash of the pair, so neighbouring indices and neighbouring global seeds give
unrelated generator streams (``global_seed + i`` would make run 0's image 1 equal run 1's image 0).
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def image_seed(global_seed: int, index: int) -> int:
    """Seed of image ``index`` of the run seeded ``global_seed``: an int in [0, 2**63)."""
    global_seed, index = int(global_seed), int(index)
    if global_seed < 0 or index < 0:
        raise ValueError(f"global seed and image index must be >= 0, got seed={global_seed}, index={index}.")
    return _splitmix64(_splitmix64(global_seed) ^ index) >> 1


def image_seeds(global_seed: int, indices: Union[torch.Tensor, Iterable[int], range]) -> torch.Tensor:
    """Seeds (long tensor ``[B]``) of the images ``indices`` of the run seeded ``global_seed``."""
    if isinstance(indices, torch.Tensor):
        indices = indices.reshape(-1).tolist()
    return torch.tensor([image_seed(global_seed, i) for i in indices], dtype=torch.long)


def generators(seeds: torch.Tensor):
    """One CPU ``torch.Generator`` per image, seeded with ``seeds[i]`` (long ``[B]``)."""
    if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.long or seeds.dim() != 1:
        raise ValueError(f"seeds must be a long tensor [B] (one seed per image; see "
                         f"heptapod_ds.sampling.image_seeds), got {type(seeds).__name__} "
                         f"{getattr(seeds, 'dtype', '')} {tuple(getattr(seeds, 'shape', ()))}.")
    out = []
    for s in seeds.tolist():
        if s < 0:
            raise ValueError(f"seeds must be >= 0, got {s}.")
        out.append(torch.Generator().manual_seed(s))
    return out
