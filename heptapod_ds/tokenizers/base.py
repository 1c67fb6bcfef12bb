"""The one interface every visual tokenizer implements, and the stored-form -> model-token maths.

What is *stored* (in a beton) and what the *model* consumes differ:

* continuous tokenizers store posterior moments ``[2C, h, w]`` (mean, log-variance) so that the
  loader can draw a fresh posterior sample every epoch (MAR-style); the model consumes
  ``sample * scale_factor`` flattened to ``[N, C]`` in raster order;
* discrete tokenizers store codes ``[h, w]``; the model consumes ``[N]`` longs in raster order.

The conversion functions are module-level so that the data loader can apply them without building
the tokenizer (which may need multi-GB weights).
"""
from __future__ import annotations

import abc
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
"""Clamp of the log-variance before sampling, as in LDM/MAR's DiagonalGaussianDistribution."""


def discrete_storage_dtype(vocab_size: int) -> np.dtype:
    """int16 when the codebook fits (FFCV handles it exactly and it halves the file), else int32."""
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def moments_to_tokens(moments: torch.Tensor, noise: Optional[torch.Tensor], scale_factor: float) -> torch.Tensor:
    """Posterior sample of ``moments`` [B, 2C, h, w] -> scaled model tokens [B, h*w, C] (raster order).

    ``noise`` (standard normal, shape [B, C, h, w]) is passed in so that callers control its seed;
    ``None`` returns the posterior mean.
    """
    if moments.dim() != 4 or moments.shape[1] % 2:
        raise ValueError(f"moments must be [B, 2C, h, w] with an even channel count, got {tuple(moments.shape)}.")
    mean, logvar = moments.float().chunk(2, dim=1)
    latent = mean
    if noise is not None:
        if noise.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match the posterior {tuple(mean.shape)}.")
        std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
        latent = mean + std * noise.to(mean)
    return latent.mul(scale_factor).flatten(2).transpose(1, 2).contiguous()


def codes_to_tokens(codes: torch.Tensor) -> torch.Tensor:
    """Codes [B, h, w] (any integer dtype) -> model tokens [B, h*w] long, raster order."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, h, w], got {tuple(codes.shape)}.")
    return codes.long().flatten(1)


def tokens_to_grid(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Model tokens [B, N, C] -> [B, C, g, g], or [B, N] -> [B, g, g]; checks N = g*g."""
    if tokens.shape[1] != grid_size * grid_size:
        raise ValueError(f"expected {grid_size * grid_size} tokens ({grid_size}x{grid_size} grid), "
                         f"got {tokens.shape[1]} (shape {tuple(tokens.shape)}).")
    if tokens.dim() == 3:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid_size, grid_size)
    if tokens.dim() == 2:
        return tokens.reshape(tokens.shape[0], grid_size, grid_size)
    raise ValueError(f"tokens must be [B, N, C] (continuous) or [B, N] (discrete), got {tuple(tokens.shape)}.")


class Tokenizer(nn.Module, abc.ABC):
    """Images <-> tokens. Images are float [B, image_channels, H, W] in [0, 1].

    ``encode`` returns the *stored* form (moments or codes, see the module docstring); ``decode``
    takes the *model* form (scaled latents [B, N, C] or codes [B, N]) and returns images in [0, 1].
    """

    name: str = ""
    is_discrete: bool = False

    def __init__(self, image_size: int, stride: int, channels: int, image_channels: int,
                 vocab_size: int = 0, scale_factor: float = 1.0):
        super().__init__()
        if image_size % stride:
            raise ValueError(f"{self.name}: image_size={image_size} is not divisible by stride={stride}.")
        self.image_size = image_size
        self.stride = stride
        self.channels = channels
        self.image_channels = image_channels
        self.vocab_size = vocab_size
        self.scale_factor = scale_factor

    # ------------------------------------------------------------------ shapes
    @property
    def grid_size(self) -> int:
        return self.image_size // self.stride

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def stored_shape(self) -> Tuple[int, ...]:
        """Shape of one stored view: [2C, h, w] (continuous) or [h, w] (discrete)."""
        g = self.grid_size
        return (g, g) if self.is_discrete else (2 * self.channels, g, g)

    @property
    def stored_dtype(self) -> np.dtype:
        return discrete_storage_dtype(self.vocab_size) if self.is_discrete else np.dtype(np.float32)

    def check_images(self, images: torch.Tensor) -> None:
        expected = (self.image_channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{self.name} tokenizer expects images [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                             f"in [0, 1], got {tuple(images.shape)}. Resize/crop to tokenizer.image_size first.")

    # ------------------------------------------------------------------ API
    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, c, H, W] in [0, 1] -> moments [B, 2C, h, w] or codes [B, h, w] (long)."""

    @abc.abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Model tokens (latents [B, N, C] scaled, or codes [B, N]) -> images [B, c, H, W] in [0, 1]."""

    def to_model_tokens(self, stored: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Stored form -> model form. Continuous: posterior sample (``noise``; None = mean) x scale."""
        if self.is_discrete:
            return codes_to_tokens(stored)
        return moments_to_tokens(stored, noise, self.scale_factor)
