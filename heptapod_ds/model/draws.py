"""A micro-batch's random draws, made on the host before the network runs.

Why on the host, ahead of the forward: the draws (label dropout, the supervision plan, the diffusion
times and noise) are functions of the per-sample seeds alone, and the shapes of the training step depend
on them (targets per image). Drawing them beside the data loader, as host tensors with their sizes as
plain Python values, means the forward never reads a device value back to the host to learn a shape,
and the tensors reach the device in a few pinned, non-blocking copies instead of per-image round trips.

The draws of image i use the generator seeded with its sample seed in a fixed order: label dropout
(one ``rand``), then the plan (counter-based, :mod:`.supervision`; it does not advance the generator),
then the diffusion times (``randint``) and noise (``randn``) of its targets. A micro-batch without seeds
draws from torch's global RNG; its diffusion draws are then made lazily, when the loss needs them (as
they always were), so that the global RNG sees the same sequence of calls as before.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .slot_packing import PackedSlots, pack_slots
from .supervision import SupervisionPlan, draw_plan, next_token_plan

_PLAN_FIELDS = ("timesteps", "rows", "slots", "sample", "counts")


@dataclass
class DiffusionNoise:
    """The diffusion loss's draws for ``R = targets x batch_mul`` rows, grouped by image, draw-major."""
    times: torch.Tensor   # long [R]: diffusion level of each row
    noise: torch.Tensor   # float32 [R, C]
    index: torch.Tensor   # long [R]: the supervised target each row noises

    def to(self, device, non_blocking: bool = False) -> "DiffusionNoise":
        return DiffusionNoise(*(t.to(device, non_blocking=non_blocking) for t in
                                (self.times, self.noise, self.index)))

    def pin_memory(self) -> "DiffusionNoise":
        return DiffusionNoise(self.times.pin_memory(), self.noise.pin_memory(), self.index.pin_memory())


@dataclass
class Draws:
    """Everything random about one micro-batch's training step (see the module docstring)."""
    plan: SupervisionPlan
    counts: Tuple[int, ...]              # targets per image, as host values (plan.counts on the host)
    drop: Optional[torch.Tensor]         # bool [B]: label replaced by "no class"; None without dropout
    diffusion: Optional[DiffusionNoise]  # continuous tokens with seeds; None: drawn when the loss runs
    generators: Optional[list]           # the generators (None entries: global RNG) for lazy draws
    training: bool                       # drawn for a model in training mode (label dropout on)
    packed: Optional[PackedSlots] = None  # the local head's cut, packed sequences (:mod:`.slot_packing`)

    @property
    def batch(self) -> int:
        return len(self.counts)

    def to(self, device, non_blocking: bool = False) -> "Draws":
        plan = SupervisionPlan(*(getattr(self.plan, f).to(device, non_blocking=non_blocking)
                                 for f in _PLAN_FIELDS))
        return dataclasses.replace(
            self, plan=plan,
            drop=None if self.drop is None else self.drop.to(device, non_blocking=non_blocking),
            diffusion=None if self.diffusion is None else self.diffusion.to(device, non_blocking),
            packed=None if self.packed is None else self.packed.to(device, non_blocking))

    def pin_memory(self) -> "Draws":
        """Page-locked host copies, so that ``to(cuda, non_blocking=True)`` does not wait (GPU only)."""
        plan = SupervisionPlan(*(getattr(self.plan, f).pin_memory() for f in _PLAN_FIELDS))
        return dataclasses.replace(
            self, plan=plan, drop=None if self.drop is None else self.drop.pin_memory(),
            diffusion=None if self.diffusion is None else self.diffusion.pin_memory(),
            packed=None if self.packed is None else self.packed.pin_memory())

    def labels(self, labels: torch.Tensor, no_class: int) -> torch.Tensor:
        """``labels`` after class dropout (on the labels' device)."""
        if self.drop is None:
            return labels
        return torch.where(self.drop, torch.full_like(labels, no_class), labels)

    def diffusion_on(self, device, cfg) -> DiffusionNoise:
        """The diffusion draws on ``device``; drawn now from the generators if not drawn ahead."""
        if self.diffusion is not None:
            return self.diffusion
        d = cfg.diffusion
        return draw_diffusion(self.generators, self.counts, d.batch_mul, cfg.tokenizer.channels,
                              d.train_steps).to(device, non_blocking=True)


def per_sample_generators(sample_seeds: Optional[torch.Tensor], batch: int) -> list:
    """One CPU generator per sample seed (host long ``[B]``); None entries (global RNG) without seeds."""
    if sample_seeds is None:
        return [None] * batch
    return [torch.Generator().manual_seed(int(s)) for s in sample_seeds.tolist()]


def draw_batch(cfg, batch: int, sample_seeds: Optional[torch.Tensor], training: bool = True) -> Draws:
    """The draws of a micro-batch of ``batch`` samples, on the host.

    ``sample_seeds``: host long ``[B]`` (``heptapod_ds.training.data_stream.sample_seeds``), or None for
    torch's global RNG. ``training``: whether the model trains (label dropout applies only then).
    """
    if sample_seeds is not None:
        if sample_seeds.device.type != "cpu":
            raise ValueError(f"sample seeds are host data: pass them on the CPU (drawing happens before the "
                             f"copy to {sample_seeds.device}), not as a {sample_seeds.device} tensor.")
        if sample_seeds.dim() != 1 or sample_seeds.shape[0] != batch:
            raise ValueError(f"sample_seeds must be [B={batch}], got {tuple(sample_seeds.shape)}.")
    gens = per_sample_generators(sample_seeds, batch)
    p = cfg.backbone.class_dropout
    drop = None
    if p > 0 and training:
        drop = torch.cat([torch.rand(1, generator=g) for g in gens]) < p
    head = cfg.head
    n = cfg.tokenizer.num_tokens
    packed = None
    if head.type == "next":
        plan = next_token_plan(batch, n)
    else:
        window = head.window if head.type == "local" else None
        plan = draw_plan(gens, n, head.timesteps, head.supervised, window)
        if window is not None:
            packed = pack_slots(plan.timesteps, plan.rows, plan.slots, n, window, head.length_buckets)
    counts = tuple(int(c) for c in plan.counts.tolist())  # host tensor: no device read
    diffusion = None
    if not cfg.tokenizer.is_discrete and sample_seeds is not None:
        d = cfg.diffusion
        diffusion = draw_diffusion(gens, counts, d.batch_mul, cfg.tokenizer.channels, d.train_steps)
    return Draws(plan=plan, counts=counts, drop=drop, diffusion=diffusion, generators=gens, training=training,
                 packed=packed)


def draw_diffusion(generators: Sequence[Optional[torch.Generator]], counts: Sequence[int], batch_mul: int,
                   channels: int, train_steps: int) -> DiffusionNoise:
    """Per image: ``count * batch_mul`` diffusion levels, then as many noise vectors, from its generator."""
    times: List[torch.Tensor] = []
    noises: List[torch.Tensor] = []
    for gen, count in zip(generators, counts):
        times.append(torch.randint(0, train_steps, (count * batch_mul,), generator=gen))
        noises.append(torch.randn(count * batch_mul, channels, generator=gen))
    counts_t = torch.tensor(list(counts), dtype=torch.long)
    return DiffusionNoise(times=torch.cat(times), noise=torch.cat(noises),
                          index=repeat_index(counts_t, batch_mul))


def repeat_index(counts: torch.Tensor, mul: int) -> torch.Tensor:
    """Row indices that repeat each image's rows ``mul`` times, image by image (vectorised).

    Rows of image i, draw r sit at ``[offset_i + r * count_i + k]``; the result is on ``counts``'
    device, computed there (sizes are read from ``counts``: pass host counts)."""
    counts = counts.to(torch.long)
    device = counts.device
    total = int(counts.sum()) if counts.numel() else 0
    if total == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    offsets = torch.cumsum(counts, 0) - counts                  # first row of each image
    block = counts * mul                                         # repeated rows of each image
    image = torch.repeat_interleave(torch.arange(len(counts), device=device), block)
    within = torch.arange(total * mul, device=device) - (torch.cumsum(block, 0) - block)[image]
    return offsets[image] + within % counts[image]
