"""Write sample grids as PNG (one row per class)."""
from __future__ import annotations

import os

import numpy as np


def save_class_grid(images, path: str, nrow: int, upscale: int = 1, pad: int = 1) -> str:
    """``images``: [rows*nrow, C, H, W] in [0, 1] (C = 1 or 3), row-major; written atomically."""
    from PIL import Image

    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {x.shape}")
    n, c, h, w = x.shape
    if n % nrow:
        raise ValueError(f"{n} images do not fill rows of {nrow}")
    rows = n // nrow
    x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y0:y0 + h, x0:x0 + w] = x[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path
