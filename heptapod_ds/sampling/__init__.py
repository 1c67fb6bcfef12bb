"""Sampling: per-image seeds (one rule for every sampler)."""
from .seeds import generators, image_seed, image_seeds

__all__ = ["generators", "image_seed", "image_seeds"]
