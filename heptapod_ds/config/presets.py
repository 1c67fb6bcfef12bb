"""Size presets. Each is a nested dict of overrides applied on top of the dataclass defaults.

The defaults of :mod:`heptapod_ds.config.schema` are the ``tiny`` CPU demo (8x8 digits, discrete
pixel tokens). The ImageNet presets use MAR's KL-16 VAE on 256x256 images (16x16 grid of
16-channel latents, 1000 classes); their sizes are chosen so that the totals printed by
``python -m heptapod_ds.presets`` land on the paper's scale (H ~ 941M) and near MAR's B/L.
"""
from __future__ import annotations

from typing import Any, Dict

_IMAGENET_DATA: Dict[str, Any] = {
    "tokenizer": {"name": "kl16", "image_size": 256, "stride": 16, "channels": 16,
                  "scale_factor": 0.2325, "vocab_size": 16384},
    "backbone": {"num_classes": 1000},
    "head": {"timesteps": 4, "supervised": 64, "window": 32},
    "diffusion": {"batch_mul": 4},
    "data": {"path": "data/imagenet256_kl16.beton", "num_workers": 8},
    "optimizer": {"lr": 8e-4, "weight_decay": 0.02, "beta2": 0.95},
    "schedule": {"warmup_steps": 5000, "decay": "cosine"},
    "train": {"global_batch_size": 2048, "micro_batch_size": 64, "grad_accum": 0, "steps": 500000,
              "ema_decay": 0.9999},
    "checkpoint": {"save_every": 5000, "keep_last": 3},
    "logging": {"log_every": 50},
}


def _imagenet(backbone_depth: int, head_depth: int, width: int, heads: int,
              diff_depth: int, diff_width: int) -> Dict[str, Any]:
    preset = {k: dict(v) for k, v in _IMAGENET_DATA.items()}
    preset["backbone"].update(depth=backbone_depth, width=width, num_heads=heads)
    preset["head"].update(depth=head_depth, width=width, num_heads=heads)
    preset["diffusion"].update(depth=diff_depth, width=diff_width)
    return preset


PRESETS: Dict[str, Dict[str, Any]] = {
    # The CPU demo: sized so that training, 1000 samples and their scoring fit in 10 minutes on 2 cores.
    # No flips: a mirrored 3 is not a 3, and training on mirrored digits makes samples of every class
    # ambiguous to a digits classifier.
    # Local head, batch 32: at the same training compute it beat the global head at batch 64 (400 steps:
    # 72.4% / 2.18) and the local head at batch 64 (93.3% / 1.58) on seed 0. Every position of the window
    # supervised (K = 0: the head computes the whole window anyway) at learning rate 7e-4: with K = 8 at 1e-3,
    # seed 2 trained badly (25.4% / 6.18; seeds 0, 1: 94.7% / 0.99, 93.0% / 1.35); README has the three seeds.
    # Temperature 0.85 (no guidance): for the local head at batch 64, 0.7 / 0.85 / 1.0 gave 96.0% / 2.02,
    # 93.3% / 1.58, 87.5% / 1.63 (class-consistency / Fréchet).
    "tiny": {"train": {"steps": 600, "global_batch_size": 32, "micro_batch_size": 32},
             "head": {"type": "local", "supervised": 0}, "optimizer": {"lr": 7e-4},
             "data": {"num_workers": 1, "random_flip": False},
             "sampling": {"batch_size": 250, "temperature": 0.85}, "checkpoint": {"save_every": 200}},
    # The CPU benchmark size (python -m heptapod_ds.bench): the digits data of tiny, layers 4x wider in
    # FLOPs so that matrix multiplies dominate the step, as they do at ImageNet scale.
    "small": {"backbone": {"depth": 4, "width": 256, "num_heads": 4},
              "head": {"depth": 2, "width": 256, "num_heads": 4},
              "train": {"steps": 400, "global_batch_size": 32, "micro_batch_size": 32},
              "data": {"num_workers": 1, "random_flip": False}},
    "B": _imagenet(backbone_depth=16, head_depth=8, width=768, heads=12, diff_depth=6, diff_width=1024),
    "L": _imagenet(backbone_depth=20, head_depth=12, width=1024, heads=16, diff_depth=8, diff_width=1280),
    "XL": _imagenet(backbone_depth=22, head_depth=14, width=1152, heads=16, diff_depth=10, diff_width=1408),
    "H": _imagenet(backbone_depth=24, head_depth=16, width=1280, heads=16, diff_depth=12, diff_width=1536),
}
