"""Class-balanced labels for FID runs: image i is drawn for class ``i % num_classes``.

Interleaving (rather than 50 images of class 0, then class 1, ...) keeps every shard of a run
class-balanced, so a partial run and a small in-training FID see all classes. N = 50,000 over 1,000
classes gives 50 per class; when N is not a multiple, the first N % C classes get one image more.
"""
from __future__ import annotations

import torch


def class_balanced_labels(num_samples: int, num_classes: int, start: int = 0, stop: int = None) -> torch.Tensor:
    """Labels (long) of images ``start..stop-1`` of a run of ``num_samples`` images."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if num_samples < num_classes:
        raise ValueError(f"{num_samples} samples cannot cover {num_classes} classes: ask for at least "
                         f"{num_classes} (a multiple of {num_classes} balances them exactly; 50,000 for FID-50K).")
    stop = num_samples if stop is None else stop
    if not 0 <= start <= stop <= num_samples:
        raise ValueError(f"image range [{start}, {stop}) is outside [0, {num_samples}).")
    return torch.arange(start, stop, dtype=torch.long) % num_classes
