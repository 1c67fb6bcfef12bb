"""Fréchet distance, float64 feature sums, Inception Score and reference files against plain references."""
import warnings

import numpy as np
import pytest
import torch

from heptapod_ds.evaluation import (FeatureStats, InceptionScoreStats, frechet_distance_from_stats,
                                    inception_score, load_ref_stats, save_ref_stats)


def _scipy_reference(mu1, s1, mu2, s2):
    """The formula of pytorch-fid / ADM's evaluator: scipy sqrtm of the product, eps fallback."""
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
        if not np.isfinite(covmean).all():
            off = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


def _stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("dim,n,rank", [(32, 400, None), (64, 1000, None),  # well conditioned
                                        (64, 20, None), (96, 40, None),     # n < d: singular covariances
                                        (48, 500, 6)])                       # rank 6 plus 1e-10 noise
def test_frechet_matches_scipy_reference(dim, n, rank):
    rng = np.random.default_rng(dim + n)
    if rank is None:
        a = rng.normal(size=(n, dim))
        b = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + 0.2
    else:
        basis = rng.normal(size=(rank, dim))
        a = rng.normal(size=(n, rank)) @ basis + 1e-5 * rng.normal(size=(n, dim))
        b = rng.normal(size=(n, rank)) @ basis * 1.5 + 1e-5 * rng.normal(size=(n, dim)) + 0.1
    mu1, s1 = _stats(a)
    mu2, s2 = _stats(b)
    ours = frechet_distance_from_stats(mu1, s1, mu2, s2)
    ref = _scipy_reference(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert frechet_distance_from_stats(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-6)  # symmetric (sqrt near 0 limits it)


def test_frechet_closed_forms_and_errors():
    eye = np.eye(3)
    assert frechet_distance_from_stats(np.zeros(3), eye, np.zeros(3), eye) == pytest.approx(0, abs=1e-12)
    # N(0, I) vs N(m, 4I): |m|^2 + 3 * (1 + 4 - 2 * 2)
    assert frechet_distance_from_stats(np.zeros(3), eye, np.ones(3), 4 * eye) == pytest.approx(3 + 3, rel=1e-12)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance_from_stats(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_stats(np.full(3, np.nan), eye, np.zeros(3), eye)


def test_feature_stats_equal_numpy_in_any_split():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(257, 16)).astype(np.float32) * 3 + 1
    whole = FeatureStats(16)
    whole.add(x)
    parts = [FeatureStats(16) for _ in range(3)]
    for i, chunk in enumerate(np.array_split(x, 7)):
        parts[i % 3].add(torch.from_numpy(chunk))
    merged = FeatureStats(16)
    for p in parts:
        merged.merge(FeatureStats.from_state(p.state()))
    mu, sigma = whole.mean_cov()
    mu2, sigma2 = merged.mean_cov()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-12, atol=1e-12)
    assert merged.count == 257
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        whole.add(x[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(4).mean_cov()


def _is_reference(logits, splits):
    """Plain per-split Inception Score (as ADM / torch-fidelity compute it)."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(np.arange(len(p)), splits):
        q = p[part]
        kl = (q * (np.log(q) - np.log(q.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_matches_reference_and_is_order_free():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(100, 20)) * 4
    mean, std = inception_score(logits, splits=10)
    ref_mean, ref_std = _is_reference(logits, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-10) and std == pytest.approx(ref_std, rel=1e-8)
    acc = InceptionScoreStats(20, total=100, splits=10)
    perm = rng.permutation(100)
    for chunk in np.array_split(perm, 9):  # any order, any chunking: indices place images in their split
        acc.add(logits[chunk], chunk)
    assert acc.score()[0] == pytest.approx(mean, rel=1e-12)
    # one confident class per image, classes spread evenly: IS = number of classes
    sharp = np.full((100, 20), -1e4)
    sharp[np.arange(100), np.arange(100) % 10] = 0
    assert inception_score(sharp, splits=1)[0] == pytest.approx(10, rel=1e-6)


def test_ref_stats_round_trip_and_errors(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    path = save_ref_stats(str(tmp_path / "ref.npz"), mu, sigma, {"extractor": "x", "count": 5})
    mu2, sigma2, info = load_ref_stats(path, expected_dim=3)
    assert np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma) and info["count"] == 5
    np.savez(tmp_path / "adm_style.npz", mu=mu.astype(np.float32), sigma=sigma, spatial_mu=mu)
    assert load_ref_stats(str(tmp_path / "adm_style.npz"))[0].dtype == np.float64
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="lack mu and sigma.*arr_0"):
        load_ref_stats(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="dimension 3 but the feature extractor gives 2048"):
        load_ref_stats(path, expected_dim=2048)
    with pytest.raises(FileNotFoundError, match="tools/ref_stats.py"):
        load_ref_stats(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_ref_stats(str(tmp_path / "junk.npz"))
