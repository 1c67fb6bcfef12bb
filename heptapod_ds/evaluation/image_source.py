"""Images for reference statistics: an ``.npz`` (``arr_0`` uint8 [N, H, W, 3], ADM's format), a folder, or
``digits`` (scikit-learn's 1797 digits as the demo samples them: grey level v/16 quantised to
``round(255 v / 16)``, repeated to RGB, 8x8).

Folder images are found recursively (png, jpg, jpeg, webp, bmp), sorted by path, converted to RGB
and optionally centre-cropped to a square as ADM's reference batches were made (``center_crop_arr``:
halve with a box filter while the short side is >= 2x the target, bicubic to the target, crop).
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence

import numpy as np

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


DIGITS = "digits"


def digits_images() -> np.ndarray:
    """The embedded digits as uint8 [1797, 8, 8, 3], quantised like the samples (``round(clip(255 x))``)."""
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32) / 16.0          # the training data's values (data/sources.py)
    grey = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def list_images(folder: str) -> List[str]:
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(EXTENSIONS)]
    return sorted(found)


def center_crop(image, size: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: a PIL image -> uint8 [size, size, 3]."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def load_image(path: str, crop: Optional[int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        return center_crop(im, crop) if crop else np.asarray(im, dtype=np.uint8)


class ImageSource:
    """``len()`` images, read in batches of equal size by global index."""

    def __init__(self, path: str, crop: Optional[int] = None, limit: Optional[int] = None):
        self.path, self.crop = path, crop
        self.array = None
        if path == DIGITS and not os.path.exists(path):
            self.array = digits_images()
            count = len(self.array)
        elif os.path.isdir(path):
            self.files = list_images(path)
            if not self.files:
                raise ValueError(f"--images {path}: no {'/'.join(EXTENSIONS)} files found (searched recursively).")
            count = len(self.files)
        elif os.path.isfile(path) and path.endswith(".npz"):
            z = np.load(path, mmap_mode="r")
            if "arr_0" not in z.files:
                raise ValueError(f"--images {path} has no 'arr_0' (keys: {z.files}); expected ADM's sample format "
                                 f"uint8 [N, H, W, 3].")
            self.array = z["arr_0"]
            if self.array.dtype != np.uint8 or self.array.ndim != 4 or self.array.shape[-1] != 3:
                raise ValueError(f"--images {path}: arr_0 is {self.array.dtype} {self.array.shape}, "
                                 f"expected uint8 [N, H, W, 3].")
            count = len(self.array)
        else:
            raise FileNotFoundError(f"--images {path}: not a folder of images nor an .npz file.")
        self.count = min(count, limit) if limit else count

    def __len__(self) -> int:
        return self.count

    def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
        """uint8 batches of ``indices`` (consecutive images of equal size grouped together)."""
        batch: List[np.ndarray] = []
        for i in indices:
            img = self.array[i] if self.array is not None else load_image(self.files[i], self.crop)
            if self.array is not None and self.crop:
                from PIL import Image

                img = center_crop(Image.fromarray(np.asarray(img)), self.crop)
            if batch and (len(batch) == batch_size or batch[0].shape != img.shape):
                yield np.stack(batch)
                batch = []
            batch.append(np.asarray(img, dtype=np.uint8))
        if batch:
            yield np.stack(batch)
