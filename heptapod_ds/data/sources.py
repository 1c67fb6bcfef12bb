"""Where pretokenize reads images from: an ImageFolder tree, or scikit-learn's bundled digits.

A source is an indexable list of (image, label) with a stable order; ``load(i)`` returns float
[C, S, S] in [0, 1] and raises :class:`ImageDecodeError` for an unreadable file (the caller skips
and reports it).
"""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jpe")


class ImageDecodeError(RuntimeError):
    """One image could not be decoded; pretokenize skips it and lists it in its report."""


class EmptySourceError(ValueError):
    """The input holds no images."""


def center_crop(image, size: int):
    """ADM's center crop: halve with a box filter while >= 2x the target, bicubic-resize the short
    side to ``size``, then crop the centre ``size`` x ``size`` square (PIL image in, PIL image out)."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderSource:
    """``root/<class>/<image>`` (ImageNet train/ or val/ layout); classes and files sorted by name."""

    def __init__(self, root: str, size: int, channels: int = 3):
        if not os.path.isdir(root):
            raise EmptySourceError(f"input folder '{root}' does not exist or is not a directory.")
        self.root, self.size, self.channels = root, size, channels
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise EmptySourceError(f"input folder '{root}' has no class sub-folders; expected the ImageFolder layout "
                                   f"root/<class>/<image>.jpg (as ImageNet's train/ and val/).")
        self.files: List[Tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
                dirnames.sort()
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        self.files.append((os.path.relpath(os.path.join(dirpath, fn), root), label))
        if not self.files:
            raise EmptySourceError(f"input folder '{root}' has {len(self.classes)} class folder(s) but no images "
                                   f"with an extension in {', '.join(IMAGE_EXTENSIONS)}.")

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.files[index][0]

    def label(self, index: int) -> int:
        return self.files[index][1]

    def load(self, index: int) -> torch.Tensor:
        from PIL import Image

        path = os.path.join(self.root, self.files[index][0])
        try:
            with Image.open(path) as im:
                im.load()
                im = im.convert("RGB" if self.channels == 3 else "L")
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            raise ImageDecodeError(f"{type(e).__name__}: {e}") from None
        arr = np.asarray(center_crop(im, self.size), dtype=np.float32) / 255.0
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def fingerprint(self) -> dict:
        return {"kind": "imagefolder", "root": os.path.abspath(self.root), "count": len(self.files),
                "classes": len(self.classes), "first": self.files[0][0], "last": self.files[-1][0]}


DIGITS_LEVELS = 16
"""scikit-learn's digits hold grey levels 0..16; pixel tokens use them as they are (vocab 17)."""


class DigitsSource:
    """scikit-learn's bundled handwritten digits: 1797 images of 8x8, 10 classes, values 0..16.

    ``load`` returns value / 16 in [0, 1], so that the ``pixel`` tokenizer with vocab 17 recovers
    the integer levels exactly and ``patch`` yields value / 16 * 2 - 1.
    """

    size = 8
    channels = 1

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = torch.from_numpy(digits.images.astype(np.float32) / DIGITS_LEVELS).unsqueeze(1)
        self.labels: Sequence[int] = [int(y) for y in digits.target]
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return f"digits[{index}]"

    def label(self, index: int) -> int:
        return self.labels[index]

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def fingerprint(self) -> dict:
        return {"kind": "sklearn-digits", "count": len(self), "classes": 10}
