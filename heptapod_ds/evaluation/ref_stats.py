"""Reference statistics files: ``.npz`` with ``mu`` [d] and ``sigma`` [d, d].

Reads MAR's ``adm_in256_stats.npz``, the ADM evaluator's ``VIRTUAL_imagenet256_labeled.npz`` and the
files ``tools/ref_stats.py`` writes (which add the extractor's name and the image count). The spatial
statistics (``mu_s``/``sigma_s``) and reference images (``arr_0``) of an ADM reference batch are read by
:mod:`.reference`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np


def load_ref_stats(path: str, expected_dim: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """``(mu, sigma, info)`` from ``path``; a clear error for a missing, unreadable or wrong file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path!r} not found (build one with tools/ref_stats.py, "
                                f"or use MAR's adm_in256_stats.npz / ADM's VIRTUAL_imagenet256_labeled.npz).")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several types for bad files
        raise ValueError(f"reference statistics {path!r} is not a readable .npz file: {e}") from e
    with data:
        keys = set(data.files)
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing:
            raise ValueError(f"reference statistics {path!r} lack {' and '.join(missing)} (keys found: "
                             f"{sorted(keys) or 'none'}); expected an .npz with 'mu' [d] and 'sigma' [d, d] "
                             f"as written by tools/ref_stats.py or shipped by MAR/ADM.")
        mu = np.asarray(data["mu"], dtype=np.float64)
        sigma = np.asarray(data["sigma"], dtype=np.float64)
        info = json.loads(str(data["info"])) if "info" in keys else {}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics {path!r}: mu {mu.shape} / sigma {sigma.shape} are not [d] / [d, d].")
    if expected_dim is not None and mu.shape[0] != expected_dim:
        raise ValueError(f"reference statistics {path!r} have dimension {mu.shape[0]} but the feature extractor "
                         f"gives {expected_dim}; build them with the same extractor.")
    return mu, sigma, info


def save_ref_stats(path: str, mu: np.ndarray, sigma: np.ndarray, info: Optional[Dict] = None,
                   mu_s: Optional[np.ndarray] = None, sigma_s: Optional[np.ndarray] = None) -> str:
    """Write ``mu``, ``sigma`` (float64), the spatial ``mu_s``/``sigma_s`` when given, and a JSON ``info``
    string atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    extra = {}
    if (mu_s is None) != (sigma_s is None):
        raise ValueError("spatial statistics need both mu_s and sigma_s.")
    if mu_s is not None:
        extra = {"mu_s": np.asarray(mu_s, np.float64), "sigma_s": np.asarray(sigma_s, np.float64)}
    np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             info=np.array(json.dumps(info or {}, sort_keys=True)), **extra)
    os.replace(tmp, path)
    return path
