"""Per-token diffusion loss for continuous tokens (MAR style), and its DDPM sampler.

A small residual MLP with adaptive LayerNorm predicts the noise added to one token ``x`` given the
head condition ``z`` and the diffusion time. Training: cosine schedule over ``train_steps`` levels,
``batch_mul`` noise draws per supervised token, MSE on the noise. Sampling: DDPM on ``num_steps``
evenly respaced levels with the posterior variance, the injected noise scaled by the temperature.

The MLP is replicated across tensor-parallel ranks (its inputs are identical on TP peers).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .init import editable


def cosine_alphas_cumprod(steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """``alpha_bar`` of the cosine schedule (Nichol & Dhariwal), float64, length ``steps``."""
    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlockAdaLN(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), with (shift, scale, gate) from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DenoiserMLP(nn.Module):
    """Noise prediction eps(x_t, t, z) for single tokens of ``channels`` channels."""

    def __init__(self, channels: int, cond_dim: int, width: int, depth: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.input_proj = nn.Linear(channels, width)
        self.time_embed = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(ResBlockAdaLN(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, channels)
        self._init_weights()

    def _init_weights(self) -> None:
        with editable(self):
            self._init_weights_full()

    def _init_weights_full(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        # Start every block as the identity and the output at zero, so early training is stable.
        for blk in self.blocks:
            nn.init.zeros_(blk.modulation[-1].weight)
            nn.init.zeros_(blk.modulation[-1].bias)
        nn.init.zeros_(self.final_modulation[-1].weight)
        nn.init.zeros_(self.final_modulation[-1].bias)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """In the weights' dtype (bf16 under DeepSpeed's bf16, which casts weights, not inputs)."""
        dtype = self.input_proj.weight.dtype
        c = self.time_embed(timestep_embedding(t, self.freq_dim).to(dtype)) + self.cond_embed(z.to(dtype))
        h = self.input_proj(x.to(dtype))
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.output(self.final_norm(h) * (1 + scale) + shift)


class DiffusionLoss(nn.Module):
    def __init__(self, channels: int, cond_dim: int, width: int, depth: int, train_steps: int,
                 batch_mul: int):
        super().__init__()
        self.channels = channels
        self.train_steps = train_steps
        self.batch_mul = batch_mul
        self.net = DenoiserMLP(channels, cond_dim, width, depth)
        # float64, not a buffer: a bf16 model (DeepSpeed casts every floating buffer) would otherwise hold
        # 1 - alpha_bar to bf16's 3 digits and divide by zero near t = 0 when sampling. One copy per device,
        # made once, so a training step on a GPU does not copy (and wait for) it from the host.
        self._alphas_cumprod = {torch.device("cpu"): cosine_alphas_cumprod(train_steps)}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod[torch.device("cpu")]

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._alphas_cumprod:
            self._alphas_cumprod[device] = self.alphas_cumprod.to(device)
        return self._alphas_cumprod[device]

    def forward(self, target: torch.Tensor, z: torch.Tensor, counts: torch.Tensor,
                generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
        """Per-target loss [S] (mean over ``batch_mul`` draws and channels).

        ``target`` [S, C] and ``z`` [S, D] are grouped by image: ``counts[i]`` rows belong to image i,
        whose diffusion times and noise come from ``generators[i]``.
        """
        mul = self.batch_mul
        times, noises = [], []
        for gen, count in zip(generators, counts.tolist()):
            times.append(torch.randint(0, self.train_steps, (count * mul,), generator=gen))
            noises.append(torch.randn(count * mul, self.channels, generator=gen))
        dtype = torch.promote_types(target.dtype, torch.float32)  # fp32 noising even in a bf16 run
        t = torch.cat(times).to(target.device)
        noise = torch.cat(noises).to(device=target.device, dtype=dtype)
        # rows of image i, draw r sit at [offset_i + r * count_i + k]: repeat per image, draw-major
        idx = _repeat_index(counts, mul).to(target.device)
        x0, cond = target[idx].to(dtype), z[idx]
        abar = self._alphas_cumprod_on(target.device)[t].to(dtype)[:, None]
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        err = (self.net(xt, t, cond).float() - noise.float()).pow(2).mean(dim=-1)  # [S * mul], fp32 in bf16 runs
        per_target = torch.zeros(target.shape[0], dtype=err.dtype, device=err.device)
        per_target.index_add_(0, idx, err)
        return per_target / mul

    @torch.no_grad()
    def sample(self, z: torch.Tensor, num_steps: int, temperature: float,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Draw one token per row of ``z`` [B, D] with DDPM over ``num_steps`` respaced levels.

        All noise of row i (start and every step) comes from ``generators[i]``, so a row's draw does
        not depend on its batch-mates. The chain runs in fp32 whatever the weights' dtype; only the
        denoiser's own arithmetic is in bf16 in a bf16 model.
        """
        if not 1 <= num_steps <= self.train_steps:
            raise ValueError(f"num_steps={num_steps} must be in [1, {self.train_steps}] "
                             f"(diffusion.train_steps).")
        if len(generators) != z.shape[0]:
            raise ValueError(f"need one generator per row: {len(generators)} generators for {z.shape[0]} rows.")
        levels = torch.linspace(0, self.train_steps - 1, num_steps, dtype=torch.float64).round().long()
        abar = self.alphas_cumprod[levels]
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype, device=abar.device), abar[:-1]])
        betas = 1 - abar / abar_prev

        def noise() -> torch.Tensor:
            rows = [torch.randn(self.channels, generator=g) for g in generators]
            out = torch.stack(rows) if rows else torch.zeros(0, self.channels)
            return out.to(device=z.device, dtype=torch.float32)

        x = noise()
        for i in reversed(range(num_steps)):
            t = torch.full((z.shape[0],), int(levels[i]), dtype=torch.long, device=z.device)
            eps = self.net(x, t, z).float()
            a, ap, b = abar[i].item(), abar_prev[i].item(), betas[i].item()
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            mean = (b * math.sqrt(ap) / (1 - a)) * x0 + ((1 - ap) * math.sqrt(1 - b) / (1 - a)) * x
            if i > 0:
                x = mean + math.sqrt(b * (1 - ap) / (1 - a)) * temperature * noise()
            else:
                x = mean
        return x


def _repeat_index(counts: torch.Tensor, mul: int) -> torch.Tensor:
    """Row indices that repeat each image's rows ``mul`` times, image by image (vectorised)."""
    counts = counts.to(torch.long)
    if counts.numel() == 0 or int(counts.sum()) == 0:
        return torch.zeros(0, dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts                  # first row of each image
    block = counts * mul                                         # repeated rows of each image
    image = torch.repeat_interleave(torch.arange(len(counts)), block)
    within = torch.arange(int(block.sum())) - (torch.cumsum(block, 0) - block)[image]
    return offsets[image] + within % counts[image]
