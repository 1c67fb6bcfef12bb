"""Shared builders for the data tests: a tiny ImageFolder with one corrupt file."""
import numpy as np
from PIL import Image


def make_image_folder(root, per_class=3, classes=("cat", "dog"), corrupt=True, seed=0):
    """JPEGs and PNGs of assorted sizes (so that the crop matters), plus one undecodable file."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(36, 70)), int(rng.integers(36, 70))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:02d}.{'png' if (i + c) % 2 else 'jpg'}")
    if corrupt:
        (root / classes[-1] / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    return root
