"""In-training FID: config checks up front, and one evaluation logs fid plus the digits metrics."""
import types

import numpy as np
import pytest
import torch

from heptapod_ds.config.loader import ConfigError, load_config


def test_eval_config_is_checked_up_front(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros(3))
    with pytest.raises(ConfigError, match="eval.fid_ref.*lack mu and sigma"):
        load_config(overrides=["eval.fid_every=5", f"eval.fid_ref={bad}"], world_size=1)
    with pytest.raises(ConfigError, match="eval.fid_samples=3 is fewer than the 10 classes"):
        load_config(overrides=["eval.fid_every=5", "eval.fid_samples=3"], world_size=1)
    with pytest.raises(ConfigError, match="needs eval.fid_ref"):
        load_config(overrides=["eval.fid_every=5", "data.path=/data/in256.beton"], world_size=1)
    with pytest.raises(ConfigError, match="fid_inception"):
        load_config(overrides=["eval.fid_every=5", "eval.fid_inception=/nowhere.pth"], world_size=1)
    assert load_config(overrides=["eval.fid_every=5"], world_size=1).eval.fid_samples == 1000


@pytest.mark.slow
def test_fid_during_training_logs_fid_and_digits_metrics(tmp_path, single_rank):
    import sys
    import os

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
    from heptapod_ds.evaluation import save_ref_stats
    from heptapod_ds.model import build_model
    from heptapod_ds.training.evaluate import fid_during_training
    from model_helpers import tiny_cfg

    ref = save_ref_stats(str(tmp_path / "ref.npz"), np.zeros(2048), np.eye(2048) * 0.01)
    cfg = tiny_cfg("discrete", "next", **{"eval.fid_every": 1, "eval.fid_samples": 10, "eval.fid_ref": ref})
    torch.manual_seed(0)
    model = build_model(cfg)
    logged = []
    trainer = types.SimpleNamespace(cfg=cfg, info=single_rank, device=torch.device("cpu"), ema=None, engine=model,
                                    model=model, step=7,
                                    progress=lambda: {"images_seen": 448, "train_flops": 1.5e12},
                                    metrics=types.SimpleNamespace(log=lambda step, rec: logged.append((step, rec))))
    out = fid_during_training(trainer)
    assert np.isfinite(out["fid"]) and out["fid"] > 0 and out["fid_samples"] == 10
    assert 0 <= out["fid_digits_class_consistency"] <= 1 and out["fid_digits_frechet"] > 0
    assert logged and logged[0][0] == 7 and logged[0][1]["fid"] == out["fid"]
    assert logged[0][1]["images_seen"] == 448 and logged[0][1]["train_flops"] == 1.5e12  # curves vs compute
    assert model.training
