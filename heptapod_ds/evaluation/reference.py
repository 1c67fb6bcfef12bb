"""Reference inputs of the ADM metrics: statistics, spatial statistics and reference images.

A reference ``.npz`` may hold (ADM's ``VIRTUAL_imagenet256_labeled.npz`` holds all of them):

* ``mu`` [2048], ``sigma`` [2048, 2048]: pool statistics (FID; required, as :func:`load_ref_stats`);
* ``mu_s`` [2023], ``sigma_s`` [2023, 2023]: spatial statistics (sFID);
* ``arr_0`` uint8 [N, H, W, 3]: reference images (precision/recall; ADM ships 10,000).

MAR's ``adm_in256_stats.npz`` has only ``mu``/``sigma``: FID only; the other metrics are absent, with
the reason (:func:`Reference.missing`). ``arr_0`` is never loaded whole: its header is read from the zip
member and images stream in batches (:func:`iter_npz_images`). The pool features of the reference images
are computed once, on every rank's share, and cached in a file beside the output
(:func:`reference_pool_features`), keyed by the reference file (path, size, mtime) and the extractor.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .inception import SPATIAL_DIM
from .ref_stats import load_ref_stats

IMAGES_KEY = "arr_0"


@dataclass
class Reference:
    path: str
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    num_images: int = 0
    image_shape: Optional[Tuple[int, ...]] = None
    info: Dict = field(default_factory=dict)

    @property
    def has_spatial(self) -> bool:
        return self.mu_s is not None

    def missing(self, metric: str, k: int = 3) -> Optional[str]:
        """Why ``metric`` ("sfid" / "precision_recall") cannot be computed from this reference, or None."""
        name = os.path.basename(self.path)
        if metric == "sfid" and not self.has_spatial:
            return (f"the reference {name} has no spatial statistics (mu_s, sigma_s): use ADM's reference batch "
                    f"or build one with tools/ref_stats.py")
        if metric == "precision_recall":
            if not self.num_images:
                return (f"the reference {name} holds no images (arr_0): precision/recall need ADM's reference "
                        f"batch or tools/ref_stats.py --keep-images N")
            if self.num_images < k + 1:
                return f"the reference {name} holds {self.num_images} images; precision/recall with k={k} need >= {k + 1}"
        return None


def _read_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}.")


def _npy_header(zf: zipfile.ZipFile, key: str):
    with zf.open(f"{key}.npy") as f:
        return _read_header(f)


def npz_image_header(path: str, key: str = IMAGES_KEY) -> Optional[Tuple[Tuple[int, ...], np.dtype]]:
    """``(shape, dtype)`` of ``key`` in the npz without reading its data; None when absent."""
    with zipfile.ZipFile(path) as zf:
        if f"{key}.npy" not in zf.namelist():
            return None
        shape, fortran, dtype = _npy_header(zf, key)
    if fortran:
        raise ValueError(f"{path}: {key} is stored in Fortran order; expected a C-ordered uint8 [N, H, W, 3].")
    return tuple(shape), dtype


def iter_npz_images(path: str, start: int, stop: int, batch: int, key: str = IMAGES_KEY) -> Iterator[np.ndarray]:
    """uint8 batches of images ``start..stop-1`` of ``key``, streamed from the zip member (bounded memory)."""
    with zipfile.ZipFile(path) as zf:
        shape, _, dtype = _npy_header(zf, key)
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        with zf.open(f"{key}.npy") as f:
            _read_header(f)
            f.seek(f.tell() + start * per_image)
            for i in range(start, stop, batch):
                n = min(batch, stop - i)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise ValueError(f"{path}: {key} ends early (images {i}..{i + n - 1} missing).")
                yield np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])


def load_reference(path: str, expected_dim: Optional[int] = None) -> Reference:
    """Read ``path``'s statistics (errors as :func:`load_ref_stats`) and check its spatial part and images."""
    mu, sigma, info = load_ref_stats(path, expected_dim=expected_dim)
    ref = Reference(path=os.path.abspath(path), mu=mu, sigma=sigma, info=info)
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        spatial = [k for k in ("mu_s", "sigma_s") if k in keys]
        if len(spatial) == 1:
            raise ValueError(f"reference {path!r} holds {spatial[0]} without "
                             f"{({'mu_s', 'sigma_s'} - set(spatial)).pop()}: spatial statistics need both.")
        if spatial:
            mu_s = np.asarray(data["mu_s"], dtype=np.float64).reshape(-1)
            sigma_s = np.asarray(data["sigma_s"], dtype=np.float64)
            if sigma_s.shape != (mu_s.shape[0], mu_s.shape[0]):
                raise ValueError(f"reference {path!r}: mu_s {mu_s.shape} / sigma_s {sigma_s.shape} are not [d] / [d, d].")
            if mu_s.shape[0] != SPATIAL_DIM:
                raise ValueError(f"reference {path!r}: spatial statistics of dimension {mu_s.shape[0]}, but ADM's "
                                 f"spatial features (mixed_6/conv, 7 x 17 x 17) have {SPATIAL_DIM}.")
            ref.mu_s, ref.sigma_s = mu_s, sigma_s
    header = npz_image_header(path)
    if header is not None:
        shape, dtype = header
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"reference {path!r}: arr_0 is {dtype} {shape}; reference images must be uint8 "
                             f"[N, H, W, 3] (ADM's layout).")
        ref.num_images, ref.image_shape = int(shape[0]), tuple(shape[1:])
    return ref


def _identity(ref: Reference, extractor_name: str) -> Dict:
    st = os.stat(ref.path)
    return {"reference": ref.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "num_images": ref.num_images,
            "extractor": extractor_name}


def read_cached_features(cache_path: str, identity: Dict) -> Optional[np.ndarray]:
    if not os.path.isfile(cache_path):
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as z:
            if json.loads(str(z["identity"])) != identity:
                return None
            pool = np.asarray(z["pool"], dtype=np.float32)
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed
        return None
    return pool if pool.shape == (identity["num_images"], pool.shape[1]) else None


def reference_pool_features(ref: Reference, extractor, cache_path: str, group=None,
                            batch_size: int = 50) -> Optional[np.ndarray]:
    """Pool features [N, 2048] of the reference images, on rank 0 of ``group`` (None on the others).

    Read from ``cache_path`` when it was written for this reference file and extractor; otherwise every
    rank extracts a contiguous share, rank 0 gathers them and writes the cache atomically.
    """
    import torch.distributed as dist

    from .collectives import gather_rows

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    identity = _identity(ref, extractor.name)
    cached = read_cached_features(cache_path, identity) if rank == 0 else None
    if distributed:
        box = [cached is not None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        have = box[0]
    else:
        have = cached is not None
    if have:
        return cached if rank == 0 else None
    n = ref.num_images
    # fixed batches of the whole file (batch b = images b*bs .. b*bs+bs-1), dealt round-robin to the ranks:
    # every image goes through the network in the same batch on any rank count
    starts = list(range(0, n, batch_size))[rank::world]
    parts = [extractor.features(batch, spatial=False)["pool"]      # one pass over the file, own batches only
             for b, batch in enumerate(iter_npz_images(ref.path, 0, n, batch_size)) if b % world == rank]
    mine = torch.cat(parts) if parts else torch.zeros(0, extractor.dim)
    index = torch.cat([torch.arange(a, min(a + batch_size, n)) for a in starts]) if starts \
        else torch.zeros(0, dtype=torch.long)
    pool = gather_rows(mine, group) if distributed else mine
    index = gather_rows(index, group) if distributed else index
    if rank != 0:
        return None
    pool = pool[torch.argsort(index)].numpy()
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    tmp = f"{cache_path}.{os.getpid()}.tmp.npz"   # one per writer (each data-parallel group's first rank)
    np.savez(tmp, pool=pool, identity=np.array(json.dumps(identity, sort_keys=True)))
    os.replace(tmp, cache_path)
    return pool


def write_reference_batch(path: str, mu, sigma, mu_s, sigma_s, info: Dict, images: Iterator[np.ndarray],
                          count: int, image_shape: Tuple[int, ...]) -> str:
    """An ADM-layout reference batch: ``arr_0`` uint8 [count, H, W, 3] streamed batch by batch, ``mu``,
    ``sigma``, ``mu_s``, ``sigma_s`` (float64) and a JSON ``info``; written to a temporary name, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    written = 0
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        info_arr = np.array(json.dumps(info, sort_keys=True))
        for key, value in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s), ("info", info_arr)):
            arr = np.asarray(value) if key == "info" else np.asarray(value, np.float64)
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (count, *image_shape)}
        with zf.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for batch in images:
                batch = np.ascontiguousarray(batch, dtype=np.uint8)
                if batch.shape[1:] != tuple(image_shape):
                    raise ValueError(f"--keep-images: images of shape {batch.shape[1:]} and {tuple(image_shape)} "
                                     f"cannot share arr_0; use --center-crop SIZE.")
                f.write(batch.tobytes())
                written += batch.shape[0]
    if written != count:
        os.remove(tmp)
        raise ValueError(f"wrote {written} reference images, expected {count}.")
    os.replace(tmp, path)
    return path
