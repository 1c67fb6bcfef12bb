"""Which samples each data-parallel rank reads, and the per-sample random draws.

Everything here is a pure function of (seed, epoch, sample index) and the batch geometry, never
of the rank's identity beyond its slot, so that:

* optimizer step s of epoch e always covers the same ``global_batch`` samples, whatever the
  data-parallel size (``global_batch = micro_batch x grad_accum x dp_size`` is what is kept fixed);
* tensor/pipeline peers (same DP rank) read identical batches;
* resuming at (epoch, step) replays exactly the batches an uninterrupted run would have seen.

Layout of one epoch: ``perm = permutation(seed, epoch)`` of all rows; global batch s is
``perm[s*G:(s+1)*G]``; DP rank r takes its contiguous ``G/dp`` slice and reads it as ``grad_accum``
micro batches. With ``drop_last`` the tail (< G rows) is left out; without it the permutation wraps
around to fill the last global batch.
"""
from __future__ import annotations

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_NOISE_LANE, _FLIP_LANE = 0x6E6F697365, 0x666C6970  # "noise", "flip"


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x48505444])  # "HPTD"
    return rng.permutation(num_samples).astype(np.int64)


def global_batches_per_epoch(num_samples: int, global_batch: int, drop_last: bool) -> int:
    return num_samples // global_batch if drop_last else -(-num_samples // global_batch)


def rank_epoch_indices(num_samples: int, seed: int, epoch: int, micro_batch: int, grad_accum: int, dp_rank: int,
                       dp_size: int, drop_last: bool) -> np.ndarray:
    """The rows DP rank ``dp_rank`` reads in ``epoch``, in order: [steps_per_epoch * micro_batch]."""
    per_rank = micro_batch * grad_accum
    global_batch = per_rank * dp_size
    steps = global_batches_per_epoch(num_samples, global_batch, drop_last)
    perm = epoch_permutation(num_samples, seed, epoch)
    order = np.resize(perm, steps * global_batch)  # wraps around only without drop_last
    return order.reshape(steps, dp_size, per_rank)[:, dp_rank].reshape(-1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices: np.ndarray, lane: int) -> np.ndarray:
    """A 64-bit key per (seed, epoch, index, lane): independent streams for noise and flips."""
    base = _splitmix64(np.array([(int(seed) * 0x1000193 + int(epoch) * 0x9E3779B1 + lane) & 0xFFFFFFFFFFFFFFFF],
                                dtype=np.uint64))
    with np.errstate(over="ignore"):
        return _splitmix64(base ^ indices.astype(np.uint64))


def flip_choices(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Bool per sample: read the flipped view."""
    return (sample_keys(seed, epoch, indices, _FLIP_LANE) >> np.uint64(63)).astype(bool)


def noise_keys(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """The key of each sample's posterior-noise stream (see :mod:`.posterior`)."""
    return sample_keys(seed, epoch, np.asarray(indices), _NOISE_LANE)


def posterior_noise(seed: int, epoch: int, indices: np.ndarray, shape) -> torch.Tensor:
    """Standard normal noise [len(indices), *shape], each sample from its own (seed, epoch, index) stream."""
    from .posterior import normals

    return normals(noise_keys(seed, epoch, indices), tuple(shape))
