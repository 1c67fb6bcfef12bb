"""``build_tokenizer(cfg.tokenizer)``: the one place that maps a TokenizerConfig to a Tokenizer."""
from __future__ import annotations

from ..config.schema import TokenizerConfig
from .base import Tokenizer
from .kl16 import KL16Tokenizer
from .pixels import PatchTokenizer, PixelTokenizer
from .vq16 import VQ16Tokenizer


def _require(cfg: TokenizerConfig, **expected) -> None:
    wrong = [f"tokenizer.{k}={getattr(cfg, k)} (must be {v})" for k, v in expected.items() if getattr(cfg, k) != v]
    if wrong:
        raise ValueError(f"tokenizer.name={cfg.name} has a fixed architecture: {', '.join(wrong)}. "
                         f"Fix these fields or use a preset that sets them (e.g. preset=B for kl16).")


def build_tokenizer(cfg: TokenizerConfig, load_weights: bool = True) -> Tokenizer:
    """A tokenizer on CPU in eval mode; kl16/vq16 load ``cfg.ckpt`` strictly (never downloaded).

    ``load_weights=False`` builds kl16/vq16 with random weights (architecture checks, tests).
    """
    if cfg.name == "kl16":
        _require(cfg, stride=16, channels=16)
        return KL16Tokenizer(image_size=cfg.image_size, scale_factor=cfg.scale_factor, ckpt=cfg.ckpt,
                             load_weights=load_weights)
    if cfg.name == "vq16":
        _require(cfg, stride=16, vocab_size=16384)
        return VQ16Tokenizer(image_size=cfg.image_size, vocab_size=cfg.vocab_size, ckpt=cfg.ckpt,
                             load_weights=load_weights)
    if cfg.name == "patch":
        return PatchTokenizer(image_size=cfg.image_size, stride=cfg.stride, channels=cfg.channels,
                              scale_factor=cfg.scale_factor)
    if cfg.name == "pixel":
        return PixelTokenizer(image_size=cfg.image_size, vocab_size=cfg.vocab_size, stride=cfg.stride)
    raise ValueError(f"unknown tokenizer.name='{cfg.name}'; choose kl16, vq16, patch or pixel.")
