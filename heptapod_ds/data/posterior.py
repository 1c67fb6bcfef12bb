"""Per-sample posterior noise and stored-latents -> tokens, compiled (numba) and parallel over samples.

Why: reseeding a ``torch.Generator`` per sample and drawing in a Python loop held the loader's main
thread for most of a batch; here one compiled pass over the batch chooses each sample's view (image
or flip), draws its noise and writes the scaled tokens in raster order, with the samples spread over
numba's threads.

The noise is counter-based: element ``e`` of sample ``i`` is a standard normal made (Box-Muller) from
the SplitMix64 stream of the sample's key (:func:`heptapod_ds.data.order.sample_keys`, a function of
(seed, epoch, index)) at counters ``2p`` and ``2p + 1`` with ``p = e // 2``. So it depends on
(seed, epoch, index) alone: not on the batch, its order, the worker count or the rank.
"""
from __future__ import annotations

import math
from typing import Optional

import numba
import numpy as np
import torch

from ..tokenizers.base import LOGVAR_MAX, LOGVAR_MIN

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_POW_M53 = 1.0 / 9007199254740992.0


@numba.njit(inline="always")
def _bits(key, counter):
    x = key + (counter + np.uint64(1)) * _GOLDEN
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


@numba.njit(inline="always")
def _normal_pair(key, pair):
    """Two standard normals from counters 2*pair and 2*pair + 1 of ``key`` (Box-Muller)."""
    b1 = _bits(key, np.uint64(2) * pair)
    b2 = _bits(key, np.uint64(2) * pair + np.uint64(1))
    u1 = (float(b1 >> _S11) + 1.0) * _TWO_POW_M53       # (0, 1]
    u2 = float(b2 >> _S11) * _TWO_POW_M53               # [0, 1)
    r = math.sqrt(-2.0 * math.log(u1))
    return r * math.cos(2.0 * math.pi * u2), r * math.sin(2.0 * math.pi * u2)


@numba.njit(parallel=True, cache=True)
def _normals_kernel(keys, out):
    """out [B, E] float32: sample b's first E normals."""
    count = out.shape[1]
    for b in numba.prange(out.shape[0]):
        key = keys[b]
        for p in range((count + 1) // 2):
            z0, z1 = _normal_pair(key, np.uint64(p))
            out[b, 2 * p] = z0
            if 2 * p + 1 < count:
                out[b, 2 * p + 1] = z1


@numba.njit(parallel=True, cache=True)
def _tokens_kernel(first, second, flips, keys, scale, lo, hi, out):
    """out [B, HW, C] = scale * (mean + exp(logvar / 2) * noise) of each sample's chosen view.

    ``first``/``second`` [B, 2C, HW] float32 (image / flipped views); ``flips`` [B] bool.
    """
    channels, hw = out.shape[2], out.shape[1]
    count = channels * hw
    for b in numba.prange(out.shape[0]):
        src = second[b] if flips[b] else first[b]
        key = keys[b]
        for p in range((count + 1) // 2):
            z0, z1 = _normal_pair(key, np.uint64(p))
            for half in range(2):
                e = 2 * p + half
                if e >= count:
                    break
                c, s = e // hw, e % hw
                logvar = min(max(src[channels + c, s], lo), hi)
                z = z0 if half == 0 else z1
                out[b, s, c] = scale * (src[c, s] + math.exp(0.5 * logvar) * z)


def normals(keys: np.ndarray, shape) -> torch.Tensor:
    """Standard normal noise [len(keys), *shape] float32, sample i from its key alone."""
    out = np.empty((len(keys), int(np.prod(shape))), dtype=np.float32)
    _normals_kernel(np.ascontiguousarray(keys, dtype=np.uint64), out)
    return torch.from_numpy(out).reshape(len(keys), *shape)


def posterior_tokens(first: torch.Tensor, second: Optional[torch.Tensor], flips: Optional[np.ndarray],
                     keys: np.ndarray, scale_factor: float) -> torch.Tensor:
    """Moments [B, 2C, h, w] (``second``: the flipped views, chosen where ``flips``) -> tokens [B, h*w, C].

    Equals ``moments_to_tokens(chosen, normals(keys, (C, h, w)), scale_factor)`` in one compiled pass.
    """
    if first.dim() != 4 or first.shape[1] % 2:
        raise ValueError(f"moments must be [B, 2C, h, w] with an even channel count, got {tuple(first.shape)}.")
    b, c2, h, w = first.shape
    if len(keys) != b:
        raise ValueError(f"{len(keys)} noise keys for a batch of {b}.")
    a = np.ascontiguousarray(first.numpy(), dtype=np.float32).reshape(b, c2, h * w)
    if second is None or flips is None:
        s, flips = a, np.zeros(b, dtype=np.bool_)
    else:
        if second.shape != first.shape:
            raise ValueError(f"flipped views {tuple(second.shape)} differ from the views {tuple(first.shape)}.")
        s = np.ascontiguousarray(second.numpy(), dtype=np.float32).reshape(b, c2, h * w)
        flips = np.ascontiguousarray(flips, dtype=np.bool_)
    out = np.empty((b, h * w, c2 // 2), dtype=np.float32)
    _tokens_kernel(a, s, flips, np.ascontiguousarray(keys, dtype=np.uint64), float(scale_factor),
                   float(LOGVAR_MIN), float(LOGVAR_MAX), out)
    return torch.from_numpy(out)
