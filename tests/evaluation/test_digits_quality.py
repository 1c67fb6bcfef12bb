import numpy as np
import pytest

from heptapod_ds.evaluation import DigitsJudge, frechet_distance, save_class_grid


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge(seed=0)


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shifted = a + np.array([3.0, 0, 0, 0])
    assert frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-6)
    # independent samples of one Gaussian are close; a wider Gaussian is far
    b = rng.normal(size=(500, 4))
    assert frechet_distance(a, b) < 0.2 < frechet_distance(a, 3 * b)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, b[:, :3])


def test_real_digits_score_high_noise_scores_low(judge):
    ref = judge.reference()
    assert judge.test_accuracy > 0.9 and ref.class_consistency > 0.9
    rng = np.random.default_rng(1)
    noise = rng.uniform(size=(200, 1, 8, 8))
    bad = judge.score(noise, rng.integers(0, 10, size=200))
    assert bad.class_consistency < 0.35
    assert bad.frechet_distance > 5 * ref.frechet_distance
    wrong_labels = judge.score(judge.x_test, (judge.y_test + 1) % 10)
    assert wrong_labels.class_consistency < 0.1


def test_bad_image_shape(judge):
    with pytest.raises(ValueError, match="8x8 single-channel"):
        judge.score(np.zeros((4, 3, 8, 8)), [0, 1, 2, 3])


def test_grid_png(tmp_path):
    from PIL import Image
    imgs = np.random.default_rng(0).uniform(size=(20, 1, 8, 8))
    path = save_class_grid(imgs, str(tmp_path / "g.png"), nrow=10, upscale=4)
    im = Image.open(path)
    assert im.size == ((10 * 9 + 1) * 4, (2 * 9 + 1) * 4)
    with pytest.raises(ValueError, match="do not fill rows"):
        save_class_grid(imgs[:7], str(tmp_path / "h.png"), nrow=10)
