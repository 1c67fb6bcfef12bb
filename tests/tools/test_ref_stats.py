"""tools/ref_stats.py: statistics of an image folder equal those of the same images as an .npz;
bad inputs are refused with a clear message."""
import importlib.util
import os

import numpy as np
import pytest


def _tool(repo_root):
    spec = importlib.util.spec_from_file_location("ref_stats_tool", os.path.join(repo_root, "tools", "ref_stats.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_folder_and_npz_give_the_same_statistics(tmp_path, repo_root):
    from PIL import Image

    from heptapod_ds.evaluation import load_ref_stats

    tool = _tool(repo_root)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    np.savez(tmp_path / "imgs.npz", arr_0=images)
    assert tool.main(["--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "a.npz"), "--no-progress"]) == 0
    assert tool.main(["--images", str(tmp_path / "imgs.npz"), "--out", str(tmp_path / "b.npz"), "--no-progress"]) == 0
    mu_a, sigma_a, info = load_ref_stats(str(tmp_path / "a.npz"), expected_dim=2048)
    mu_b, sigma_b, _ = load_ref_stats(str(tmp_path / "b.npz"))
    assert info["count"] == 3 and info["extractor"].startswith("bundled")
    np.testing.assert_allclose(mu_a, mu_b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma_a, sigma_b, rtol=1e-12, atol=1e-12)


def test_bad_image_inputs(tmp_path, repo_root, capsys):
    tool = _tool(repo_root)
    (tmp_path / "empty").mkdir()
    assert tool.main(["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "no .png/.jpg" in capsys.readouterr().err
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(3), sigma=np.eye(3))
    assert tool.main(["--images", str(tmp_path / "stats_only.npz"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "no 'arr_0'" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
