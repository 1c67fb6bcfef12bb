"""The ADM evaluator's metrics against independent computations: the spatial features are the bundled
TorchScript's own mixed_6/conv; sFID and FID from accumulated sums equal a float64 computation through an
SVD; precision/recall equal a brute-force k-NN (ties, duplicates, any block sizes) and behave as defined
on constructed sets; reference batches are read as ADM ships them."""
import numpy as np
import pytest
import torch

from heptapod_ds.evaluation import FeatureStats, frechet_distance_from_stats
from heptapod_ds.evaluation.precision_recall import knn_radii, precision_recall


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundled():
    from heptapod_ds.evaluation.extractors import build_extractor

    return build_extractor("bundled", batch_size=4)


def _images(n, size=16, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _torchscript_mixed_6_conv(images):
    """The TF graph's mixed_6/conv:0 from the bundled TorchScript itself (its modules keep TF's names)."""
    from heptapod_ds.evaluation.extractors import bundled_weights_path
    from heptapod_ds.evaluation.inception import preprocess

    layers = torch.jit.load(bundled_weights_path(), map_location="cpu").eval().net.layers
    with torch.no_grad():
        x = preprocess(images)
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                     "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            x = getattr(layers, name)(x)
        return layers.mixed_6.conv(x)          # [N, 192, 17, 17] (TF: [N, 17, 17, 192])


def test_spatial_features_are_torchscript_mixed_6_conv_first_7_channels_nhwc(bundled):
    images = _images(3)
    feats = bundled.features(images)
    conv = _torchscript_mixed_6_conv(images)
    assert conv.shape == (3, 192, 17, 17)
    nhwc = conv.permute(0, 2, 3, 1)[..., :7].reshape(3, -1)   # ADM: spatial[..., :7], reshaped [N, -1]
    assert feats["spatial"].shape == (3, 2023)
    assert (feats["spatial"] - nhwc).abs().max() <= 1e-5 * nhwc.abs().max()
    # element (h, w, c) sits at (h * 17 + w) * 7 + c
    assert feats["spatial"][1, (4 * 17 + 9) * 7 + 5] == pytest.approx(float(conv[1, 5, 4, 9]), rel=1e-5, abs=1e-6)
    pool, logits = bundled(images)                # the plain call is unchanged, bit for bit
    assert torch.equal(pool, feats["pool"]) and logits is None and "logits" not in feats
    # with a classifier (the pytorch-fid file's layout) the same pass gives the logits too
    import copy

    from heptapod_ds.evaluation.extractors import FeatureExtractor

    net = copy.deepcopy(bundled.net)
    net.fc = torch.nn.Linear(2048, 1008)
    with_fc = FeatureExtractor(net, name="test-fc", batch_size=4)
    both = with_fc.features(images)
    assert torch.equal(both["logits"], with_fc(images)[1]) and torch.equal(both["spatial"], feats["spatial"])


def _direct_frechet(a, b):
    """Fréchet distance of two feature sets [n, d] in float64 without forming a d x d square root:
    with centred A [d, n1], B [d, n2], S1 = A A^T / (n1 - 1), S2 = B B^T / (n2 - 1), the non-zero eigenvalues
    of S1 S2 are the squared singular values of A^T B / sqrt((n1 - 1)(n2 - 1)), so Tr((S1 S2)^1/2) is that
    matrix's nuclear norm (exact for the singular covariances of a few images in 2023 / 2048 dimensions)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    m = ca @ cb.T / np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_sqrt = np.linalg.svd(m, compute_uv=False).sum()
    d = a.mean(0) - b.mean(0)
    tr_a, tr_b = (ca ** 2).sum() / (len(a) - 1), (cb ** 2).sum() / (len(b) - 1)
    return d @ d + tr_a + tr_b - 2 * trace_sqrt


def test_sfid_and_fid_from_sums_equal_float64_direct_computation(bundled):
    """Sums of two "ranks" vs a float64 computation on the features extracted here directly."""
    a, b = _images(12, seed=1), _images(10, size=24, seed=2)
    fa, fb = bundled.features(a), bundled.features(b)
    for key, dim in (("spatial", 2023), ("pool", 2048)):
        parts = [FeatureStats(dim), FeatureStats(dim)]
        for i, chunk in enumerate(torch.split(fa[key], 5)):
            parts[i % 2].add(chunk)
        parts[0].merge(parts[1])
        ref = FeatureStats(dim)
        ref.add(fb[key])
        ours = frechet_distance_from_stats(*parts[0].mean_cov(), *ref.mean_cov())
        x, y = fa[key].double().numpy(), fb[key].double().numpy()
        np.testing.assert_allclose(parts[0].mean_cov()[1], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
        # the eigen-decomposition of a singular covariance costs ~1e-7 relative (sqrt of rounding-level
        # eigenvalues); the sums themselves agree with numpy to 1e-10 (above)
        assert ours == pytest.approx(_direct_frechet(x, y), rel=1e-6), key


def _brute_force_pr(ref, smp, k):
    """Direct differences in float64, full matrices, sort: the definition, nothing shared with the code."""
    ref, smp = np.asarray(ref, np.float64), np.asarray(smp, np.float64)

    def d2(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]       # itself (0) is the first of the k + 1
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
    cross = d2(smp, ref)                              # [samples, reference]
    precision = (cross <= r_ref[None, :]).any(1).mean()
    recall = (cross.T <= r_smp[None, :]).any(1).mean()
    return float(precision), float(recall), r_ref


@pytest.mark.parametrize("kind", ["integers", "gaussian", "duplicates"])
@pytest.mark.parametrize("k,row,col", [(3, 10000, 10000), (3, 7, 5), (1, 4, 9), (5, 13, 3)])
def test_precision_recall_equal_brute_force(kind, k, row, col):
    rng = np.random.default_rng(hash((kind, k)) % 2**32)
    if kind == "integers":     # a 3-level lattice in 4-d: many exact ties and duplicates, exact arithmetic
        ref, smp = rng.integers(0, 3, size=(41, 4)), rng.integers(0, 3, size=(29, 4)) + (rng.random((29, 4)) < 0.1)
    elif kind == "gaussian":
        ref, smp = rng.normal(size=(50, 16)), rng.normal(size=(37, 16)) * 1.3 + 0.4
    else:                      # samples copy some reference points; each set repeats some of its own points
        ref = rng.normal(size=(30, 8)).round(1)
        ref[10:15] = ref[:5]
        smp = np.concatenate([ref[:12], rng.normal(size=(20, 8)).round(1)])
        smp[25:28] = smp[20]
    p, r, radii = _brute_force_pr(ref, smp, k)
    out = precision_recall(ref.astype(np.float64), smp.astype(np.float64), k=k, row_batch=row, col_batch=col)
    assert (out.precision, out.recall) == (p, r)
    assert out.k == k and out.num_reference == len(ref) and out.num_samples == len(smp)
    np.testing.assert_allclose(knn_radii(ref.astype(np.float64), k, row, col).numpy(), radii, rtol=1e-12, atol=1e-12)
    assert 0 < p <= 1 and 0 < r <= 1


def test_precision_recall_constructed_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    same = precision_recall(x, x.copy(), row_batch=16, col_batch=11)
    assert (same.precision, same.recall) == (1.0, 1.0)
    # a 1-d grid of 200 reference points (spacing h) embedded by a random rotation; the samples are 100
    # midpoints of its first half: inside the reference manifold, covering half of it
    h, rot = 1.0 / 200, np.linalg.qr(rng.normal(size=(16, 16)))[0]
    line = np.zeros((200, 16))
    line[:, 0] = np.arange(200) * h
    half = np.zeros((100, 16))
    half[:, 0] = (np.arange(100) + 0.5) * h
    out = precision_recall(line @ rot, half @ rot, k=3)
    assert out.precision == 1.0
    assert 0.5 <= out.recall <= 0.53           # the first half, plus the few points within a sample radius
    far = precision_recall(line @ rot, half @ rot + 10.0)
    assert (far.precision, far.recall) == (0.0, 0.0)


def test_precision_recall_bad_inputs():
    with pytest.raises(ValueError, match="at least 4 feature vectors"):
        knn_radii(np.zeros((3, 5)), k=3)
    with pytest.raises(ValueError, match="same network"):
        precision_recall(np.zeros((5, 4)), np.zeros((5, 3)))


def test_reference_batch_reading(tmp_path):
    from heptapod_ds.evaluation.reference import iter_npz_images, load_reference

    imgs = np.random.default_rng(0).integers(0, 256, size=(7, 4, 4, 3), dtype=np.uint8)
    mu_s, sigma_s = np.zeros(2023), np.eye(2023)
    np.savez(tmp_path / "adm.npz", arr_0=imgs, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=mu_s, sigma_s=sigma_s)
    ref = load_reference(str(tmp_path / "adm.npz"), expected_dim=2048)
    assert ref.has_spatial and ref.num_images == 7 and ref.image_shape == (4, 4, 3)
    assert ref.missing("sfid") is None and ref.missing("precision_recall") is None
    assert np.array_equal(np.concatenate(list(iter_npz_images(ref.path, 2, 7, 2))), imgs[2:])
    np.savez_compressed(tmp_path / "deflated.npz", arr_0=imgs, mu=np.zeros(3), sigma=np.eye(3))
    assert np.array_equal(np.concatenate(list(iter_npz_images(str(tmp_path / "deflated.npz"), 1, 4, 3))), imgs[1:4])
    np.savez(tmp_path / "mar.npz", mu=np.zeros(3), sigma=np.eye(3))
    mar = load_reference(str(tmp_path / "mar.npz"))
    assert "no spatial statistics" in mar.missing("sfid") and "no images" in mar.missing("precision_recall")
    np.savez(tmp_path / "few.npz", arr_0=imgs[:3], mu=np.zeros(3), sigma=np.eye(3))
    assert "holds 3 images" in load_reference(str(tmp_path / "few.npz")).missing("precision_recall", k=3)
    np.savez(tmp_path / "half.npz", mu=np.zeros(3), sigma=np.eye(3), mu_s=mu_s)
    with pytest.raises(ValueError, match="mu_s without sigma_s"):
        load_reference(str(tmp_path / "half.npz"))
    np.savez(tmp_path / "float.npz", arr_0=imgs.astype(np.float32), mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="uint8"):
        load_reference(str(tmp_path / "float.npz"))
