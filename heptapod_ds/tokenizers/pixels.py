"""Weight-free tokenizers for the embedded digits dataset and for tests.

* ``patch`` (continuous): each stride x stride patch of an image mapped to [-1, 1] is one token of
  ``stride^2 * image_channels`` channels. Stored as moments whose log-variance is a very negative
  constant, so that a "posterior sample" is the pixels themselves: the continuous code path is
  exercised end to end without a VAE.
* ``pixel`` (discrete): each grey level quantised to ``vocab_size`` levels is one token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LOGVAR_MIN, Tokenizer, tokens_to_grid

DETERMINISTIC_LOGVAR = LOGVAR_MIN
"""log-variance stored for ``patch`` moments: std = exp(-15) ~ 3e-7, i.e. deterministic pixels."""


class PatchTokenizer(Tokenizer):
    name = "patch"
    is_discrete = False

    def __init__(self, image_size: int, stride: int, channels: int, scale_factor: float = 1.0):
        if channels % (stride * stride):
            raise ValueError(f"patch tokenizer: tokenizer.channels={channels} must be stride^2 x image channels "
                             f"(stride={stride}: {stride * stride} for grey, {3 * stride * stride} for RGB).")
        super().__init__(image_size=image_size, stride=stride, channels=channels,
                         image_channels=channels // (stride * stride), scale_factor=scale_factor)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        mean = F.pixel_unshuffle(images.float() * 2.0 - 1.0, self.stride)
        return torch.cat([mean, torch.full_like(mean, DETERMINISTIC_LOGVAR)], dim=1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens_to_grid(tokens.float(), self.grid_size) / self.scale_factor
        return ((F.pixel_shuffle(grid, self.stride) + 1.0) * 0.5).clamp(0.0, 1.0)


class PixelTokenizer(Tokenizer):
    name = "pixel"
    is_discrete = True

    def __init__(self, image_size: int, vocab_size: int, stride: int = 1):
        if stride != 1:
            raise ValueError(f"pixel tokenizer: one token per pixel needs tokenizer.stride=1, got {stride}.")
        if vocab_size < 2:
            raise ValueError(f"pixel tokenizer: tokenizer.vocab_size={vocab_size} must be >= 2 grey levels.")
        super().__init__(image_size=image_size, stride=1, channels=1, image_channels=1, vocab_size=vocab_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        levels = self.vocab_size - 1
        return torch.round(images[:, 0].float().clamp(0.0, 1.0) * levels).long()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = tokens_to_grid(tokens.long(), self.grid_size)
        if codes.min() < 0 or codes.max() >= self.vocab_size:
            raise ValueError(f"pixel codes must lie in [0, {self.vocab_size}), got [{codes.min()}, {codes.max()}].")
        return (codes.float() / (self.vocab_size - 1)).unsqueeze(1)
