"""The Fréchet distance between two Gaussians, in float64.

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2})

Tr((S_1 S_2)^{1/2}) is computed as the sum of the square roots of the eigenvalues of the symmetric
positive semi-definite matrix S_1^{1/2} S_2 S_1^{1/2} (similar to S_1 S_2, so it has the same
eigenvalues). Unlike scipy's ``sqrtm(S_1 @ S_2)`` of the reference FID code this never produces
complex or non-finite values on the rank-deficient covariances of small sample sets, and agrees
with it to ~1e-8 relative where that code is accurate (tests/evaluation/test_frechet.py).
"""
from __future__ import annotations

import numpy as np


def _as_stats(mu, sigma, name: str):
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: expected mu [d] and sigma [d, d], got {mu.shape} and {sigma.shape}.")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu/sigma contain NaN or inf.")
    return mu, (sigma + sigma.T) / 2


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); inputs are cast to float64."""
    mu1, sigma1 = _as_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (were both statistics "
                         f"computed with the same feature extractor?).")
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
