"""LlamaGen's VQ-16 tokenizer (16384 codes of dim 8, l2-normalised codebook, stride 16).

Module and parameter names follow LlamaGen's ``tokenizer/tokenizer_image/vq_model.py`` so that
the public ``vq_ds16_c2i.pt`` (``{"model": state_dict}``) loads with strict key and shape matching.
Our own implementation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Tokenizer, tokens_to_grid
from .checkpoint import load_public_checkpoint
from .conv_blocks import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm, to_signed, to_unit

VQ16_URL = "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt"
VQ16_FORMAT = ("LlamaGen's vq_ds16_c2i.pt: a torch file {'model': state_dict} of VQ_16 (codebook 16384 x 8, "
               "z_channels 256, ch_mult (1, 1, 2, 2, 4)) with keys encoder.*, decoder.*, quantize.*, quant_conv.*, "
               "post_quant_conv.*")


class _Level(nn.Module):
    """``res`` blocks, ``attn`` blocks (lowest resolution only) and an optional resampler."""

    def __init__(self, res, attn, resample: Optional[nn.Module], resample_name: str):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self._resample_name = resample_name if resample is not None else None
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return getattr(self, self._resample_name)(h) if self._resample_name else h


def _middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)])


class VQEncoder(nn.Module):
    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, z_channels: int = 256):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        widths = [ch] + [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.conv_blocks = nn.ModuleList()
        for i in range(len(ch_mult)):
            c_in, c_out = widths[i], widths[i + 1]
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks)]
            attn = [AttnBlock(c_out) for _ in range(num_res_blocks)] if i == last else []
            self.conv_blocks.append(_Level(res, attn, Downsample(c_out) if i != last else None, "downsample"))
        self.mid = _middle(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQDecoder(nn.Module):
    """``conv_blocks[0]`` is the lowest resolution (it carries the attention), as in LlamaGen."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 out_channels: int = 3, z_channels: int = 256):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _middle(c)
        self.conv_blocks = nn.ModuleList()
        for n, i in enumerate(reversed(range(len(ch_mult)))):
            c_out = ch * ch_mult[i]
            res = [ResnetBlock(c if j == 0 else c_out, c_out) for j in range(num_res_blocks + 1)]
            attn = [AttnBlock(c_out) for _ in range(num_res_blocks + 1)] if n == 0 else []
            c = c_out
            self.conv_blocks.append(_Level(res, attn, Upsample(c_out) if i != 0 else None, "upsample"))
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codeword lookup on the unit sphere (both the latent and the codebook are l2-normalised).

    ``codebook_used`` is a training-time usage buffer of the public checkpoint; it is kept only so
    that the file loads strictly.
    """

    def __init__(self, codebook_size: int = 16384, embed_dim: int = 8):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> codes [B, h, w] (argmax cosine = argmin distance on the sphere)."""
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), p=2, dim=-1)
        idx = torch.argmax(flat @ self.codebook().t(), dim=1)
        return idx.view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> quantised latents [B, D, h, w]."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, codebook_size: int = 16384, embed_dim: int = 8, z_channels: int = 256, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4)):
        super().__init__()
        self.encoder = VQEncoder(ch=ch, ch_mult=ch_mult, z_channels=z_channels)
        self.decoder = VQDecoder(ch=ch, ch_mult=ch_mult, z_channels=z_channels)
        self.quantize = VectorQuantizer(codebook_size, embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.quant_conv(self.encoder(x)))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))


class VQ16Tokenizer(Tokenizer):
    """Discrete tokens from LlamaGen's VQ-16. ``ch``/``z_channels`` below the public sizes: tests only."""

    name = "vq16"
    is_discrete = True

    def __init__(self, image_size: int = 256, vocab_size: int = 16384, ckpt: Optional[str] = None,
                 ch: int = 128, z_channels: int = 256, load_weights: bool = True):
        super().__init__(image_size=image_size, stride=16, channels=8, image_channels=3, vocab_size=vocab_size)
        self.vq = VQModel(codebook_size=vocab_size, ch=ch, z_channels=z_channels)
        if load_weights:
            load_public_checkpoint(self.vq, ckpt, tokenizer="vq16", expected_format=VQ16_FORMAT,
                                   published_at=VQ16_URL)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.vq.encode_codes(to_signed(images))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        codes = tokens_to_grid(tokens.long(), self.grid_size)
        if codes.min() < 0 or codes.max() >= self.vocab_size:
            raise ValueError(f"vq16 codes must lie in [0, {self.vocab_size}), got [{codes.min()}, {codes.max()}].")
        return to_unit(self.vq.decode_codes(codes).float())
