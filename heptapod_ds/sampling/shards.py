"""Shard files of a sampling run, and the final ``samples.npz``.

A run of N images is cut into shards of ``shard_size`` consecutive images. A finished shard is one
``shards/shard_{k:06d}.npz`` (written to a temporary name, then renamed) holding the images (uint8
[S, H, W, 3]), their global indices and labels, the run's fingerprint, and the extractor's features
when one was used. On resume every shard is opened and checked (fingerprint, indices, shapes); a
damaged one is deleted and drawn again, so an interrupted run ends with the same ``samples.npz``.
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from heptapod_ds.monitor import get_logger

log = get_logger(__name__)

SHARD_DIR = "shards"


def shard_ranges(num_samples: int, shard_size: int) -> List[Tuple[int, int]]:
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def shard_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, SHARD_DIR, f"shard_{k:06d}.npz")


def write_shard(path: str, data: Dict[str, np.ndarray]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **data)
    os.replace(tmp, path)


def read_shard(path: str, fingerprint: str, start: int, stop: int,
               features: Optional[str] = None) -> Tuple[Optional[Dict[str, np.ndarray]], str]:
    """``(arrays, "")`` for a good shard, ``(None, reason)`` otherwise (missing, foreign or damaged)."""
    if not os.path.isfile(path):
        return None, "missing"
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a truncated zip raises several types
        return None, f"unreadable ({type(e).__name__}: {e})"
    if str(data.get("fingerprint", "")) != fingerprint:
        return None, "written by a run with other settings"
    idx = data.get("indices")
    if idx is None or not np.array_equal(idx, np.arange(start, stop)):
        return None, f"does not hold images {start}..{stop - 1}"
    imgs = data.get("images")
    if imgs is None or imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[0] != stop - start or imgs.shape[3] != 3:
        return None, "images are not uint8 [S, H, W, 3]"
    if features is not None and str(data.get("extractor", "")) != features:
        data.pop("pool", None)
        data.pop("spatial", None)
        data.pop("logits", None)
    return data, ""


def clean_temporaries(out_dir: str) -> None:
    folder = os.path.join(out_dir, SHARD_DIR)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".tmp.npz"):
                os.remove(os.path.join(folder, name))


def write_samples_npz(path: str, shards: Iterable[np.ndarray], total: int, image_shape: Tuple[int, ...]) -> None:
    """ADM-evaluator ``.npz`` (``arr_0`` uint8 [N, H, W, 3]) streamed shard by shard.

    The zip entry has a fixed timestamp and no compression, so the same images give the same bytes.
    """
    tmp = path + ".tmp"
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (total, *image_shape)}
    info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    written = 0
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        with zf.open(info, "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for arr in shards:
                arr = np.ascontiguousarray(arr, dtype=np.uint8)
                if arr.shape[1:] != tuple(image_shape):
                    raise ValueError(f"shard images {arr.shape[1:]} differ from {image_shape}.")
                f.write(arr.tobytes())
                written += arr.shape[0]
    if written != total:
        os.remove(tmp)
        raise ValueError(f"wrote {written} images, expected {total}.")
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)
