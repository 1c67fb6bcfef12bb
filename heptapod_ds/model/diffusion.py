"""Per-token diffusion loss for continuous tokens (MAR style), and its DDPM sampler.

A small residual MLP with adaptive LayerNorm predicts the noise added to one token ``x`` given the
head condition ``z`` and the diffusion time. Training: cosine schedule over ``train_steps`` levels,
``batch_mul`` noise draws per supervised token, MSE on the noise. Sampling: DDPM on ``num_steps``
evenly respaced levels with the posterior variance, the injected noise scaled by the temperature.

The MLP is replicated across tensor-parallel ranks (its inputs are identical on TP peers).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .init import editable

if TYPE_CHECKING:
    from .draws import DiffusionNoise


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

    def forward(self, target: torch.Tensor, z: torch.Tensor, draws: "DiffusionNoise") -> torch.Tensor:
        """Per-target loss [S] (mean over ``batch_mul`` draws and channels).

        ``target`` [S, C] and ``z`` [S, D] are grouped by image; ``draws`` (on their device) holds the
        diffusion level, noise and target row of each of the ``S * batch_mul`` noised copies, drawn ahead
        from the per-image generators (:func:`heptapod_ds.model.draws.draw_diffusion`).
        """
        mul = self.batch_mul
        dtype = torch.promote_types(target.dtype, torch.float32)  # fp32 noising even in a bf16 run
        t, idx = draws.times, draws.index
        noise = draws.noise.to(dtype)
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
        abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        betas = 1 - abar / abar_prev
        # host values of the schedule: the chain's coefficients never come from the device
        levels, abar, abar_prev, betas = (v.tolist() for v in (levels, abar, abar_prev, betas))
        noise = chain_noise(generators, num_steps, self.channels).to(device=z.device, dtype=torch.float32,
                                                                     non_blocking=True)
        x = noise[:, 0]
        for k, i in enumerate(reversed(range(num_steps))):
            t = torch.full((z.shape[0],), levels[i], dtype=torch.long, device=z.device)
            eps = self.net(x, t, z).float()
            a, ap, b = abar[i], abar_prev[i], betas[i]
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            mean = (b * math.sqrt(ap) / (1 - a)) * x0 + ((1 - ap) * math.sqrt(1 - b) / (1 - a)) * x
            if i > 0:
                x = mean + math.sqrt(b * (1 - ap) / (1 - a)) * temperature * noise[:, k + 1]
            else:
                x = mean
        return x


def chain_noise(generators: Sequence[torch.Generator], num_steps: int, channels: int) -> torch.Tensor:
    """All noise of one token's DDPM chain, ``[B, num_steps, C]`` on the host: row i's start noise and
    the noise of each later step, in that order, from ``generators[i]``.

    One ``randn`` per row when ``channels`` is a multiple of 16: torch's CPU normal sampler then fills
    16-value blocks independently, so one call of ``num_steps * C`` values equals ``num_steps`` calls of
    ``C`` (the draws of the step-by-step chain, bit for bit). Other widths take one call per step, since
    there the sampler's tail handling makes one long call differ from several short ones.
    """
    if not generators:
        return torch.zeros(0, num_steps, channels)
    if channels % 16 == 0:
        rows = [torch.randn(num_steps, channels, generator=g) for g in generators]
    else:
        rows = [torch.stack([torch.randn(channels, generator=g) for _ in range(num_steps)]) for g in generators]
    return torch.stack(rows)
