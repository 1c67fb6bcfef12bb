"""MAR's KL-16 VAE (LDM-style AutoencoderKL, 16 latent channels, stride 16, latents x 0.2325).

Module and parameter names follow MAR's ``models/vae.py`` so that the public ``kl16.ckpt``
(``{"model": state_dict}``) loads with strict key and shape matching. Our own implementation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Tokenizer, moments_to_tokens, tokens_to_grid
from .checkpoint import load_public_checkpoint
from .conv_blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm, to_signed, to_unit

KL16_URL = ("github.com/LTH14/mar (its README: `python util/download.py` fetches "
            "pretrained_models/vae/kl16.ckpt)")
KL16_FORMAT = ("MAR's kl16.ckpt: a torch file {'model': state_dict} of AutoencoderKL(embed_dim=16, "
               "ch_mult=(1, 1, 2, 2, 4)) with keys encoder.*, decoder.*, quant_conv.*, post_quant_conv.*")


class _Stage(nn.Module):
    """One resolution level: residual blocks, optional attention after each, optional resampler."""

    def __init__(self, blocks: Sequence[nn.Module], attns: Sequence[nn.Module], resample: Optional[nn.Module],
                 resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            setattr(self, resample_name, resample)
        self._resample_name = resample_name if resample is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self._resample_name)(h) if self._resample_name else h


class _Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class KLEncoder(nn.Module):
    """Image [-1, 1] -> 2*z_channels moments at 1/2^(levels-1) resolution.

    Attention sits at the last (16x16 for a 256 input) level, as in MAR's ``attn_resolutions=(16,)``
    counted from a nominal 256 resolution: the weight layout does not depend on the input size.
    """

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, z_channels: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels = len(ch_mult)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList()
        for i in range(levels):
            c_in, c_out = widths[i], widths[i + 1]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks)]
            attns = [AttnBlock(c_out) for _ in range(num_res_blocks)] if i == levels - 1 else []
            resample = Downsample(c_out) if i != levels - 1 else None
            self.down.append(_Stage(blocks, attns, resample, "downsample"))
        self.mid = _Middle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class KLDecoder(nn.Module):
    """Latent z -> image [-1, 1]; ``up`` is indexed by resolution level (0 = full resolution)."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 out_channels: int = 3, z_channels: int = 16):
        super().__init__()
        levels = len(ch_mult)
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _Middle(c)
        stages = []
        for i in reversed(range(levels)):
            c_out = ch * ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out) for j in range(num_res_blocks + 1)]
            c = c_out
            stages.insert(0, _Stage(blocks, [], Upsample(c_out) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """MAR's KL-VAE: ``encoder`` -> ``quant_conv`` -> moments; ``post_quant_conv`` -> ``decoder``."""

    def __init__(self, embed_dim: int = 16, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4)):
        super().__init__()
        self.encoder = KLEncoder(ch=ch, ch_mult=ch_mult, z_channels=embed_dim)
        self.decoder = KLDecoder(ch=ch, ch_mult=ch_mult, z_channels=embed_dim)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class KL16Tokenizer(Tokenizer):
    """Continuous tokens from MAR's KL-16 VAE. ``ch`` < 128 builds a narrower net (tests only)."""

    name = "kl16"
    is_discrete = False

    def __init__(self, image_size: int = 256, scale_factor: float = 0.2325, ckpt: Optional[str] = None,
                 ch: int = 128, load_weights: bool = True):
        super().__init__(image_size=image_size, stride=16, channels=16, image_channels=3,
                         scale_factor=scale_factor)
        self.vae = AutoencoderKL(embed_dim=16, ch=ch)
        if load_weights:
            load_public_checkpoint(self.vae, ckpt, tokenizer="kl16", expected_format=KL16_FORMAT,
                                   published_at=KL16_URL, training_only_prefixes=("loss.",))
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.vae.encode_moments(to_signed(images)).float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        z = tokens_to_grid(tokens, self.grid_size) / self.scale_factor
        return to_unit(self.vae.decode_latent(z).float())

    def posterior_tokens(self, moments: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A posterior sample x scale as model tokens, with noise from ``generator``."""
        noise = torch.randn(moments.shape[0], moments.shape[1] // 2, *moments.shape[2:], generator=generator)
        return moments_to_tokens(moments, noise.to(moments.device), self.scale_factor)
