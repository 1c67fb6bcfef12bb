"""In-training evaluation: sFID and precision/recall beside the FID (off by default, checked up front), the
tokenizer built once and decoding only where its images are used, and collectives handed tensors on the
collective's device (a CUDA tensor for NCCL, checked with a fake CUDA device on the CPU build)."""
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from heptapod_ds.config.loader import ConfigError, load_config


def _ref_batch(path, images=6, spatial=True):
    arrays = {"mu": np.zeros(2048), "sigma": np.eye(2048) * 0.01}
    if spatial:
        arrays.update(mu_s=np.zeros(2023), sigma_s=np.eye(2023) * 0.01)
    if images:
        arrays["arr_0"] = np.random.default_rng(0).integers(0, 256, size=(images, 8, 8, 3), dtype=np.uint8)
    np.savez(path, **arrays)
    return str(path)


def test_adm_eval_fields_are_off_by_default_and_checked_up_front(tmp_path):
    cfg = load_config(overrides=["eval.fid_every=5"], world_size=1)
    assert cfg.eval.fid_sfid is False and cfg.eval.fid_precision_recall is False
    stats_only = _ref_batch(tmp_path / "mar.npz", images=0, spatial=False)
    with pytest.raises(ConfigError, match="eval.fid_sfid: the reference mar.npz has no spatial statistics"):
        load_config(overrides=["eval.fid_every=5", f"eval.fid_ref={stats_only}", "eval.fid_sfid=true"],
                    world_size=1)
    with pytest.raises(ConfigError, match="eval.fid_precision_recall: the reference mar.npz holds no images"):
        load_config(overrides=["eval.fid_every=5", f"eval.fid_ref={stats_only}", "eval.fid_precision_recall=true"],
                    world_size=1)
    few = _ref_batch(tmp_path / "few.npz", images=3)
    with pytest.raises(ConfigError, match="holds 3 images; precision/recall with k=3 need >= 4"):
        load_config(overrides=["eval.fid_every=5", f"eval.fid_ref={few}", "eval.fid_precision_recall=true"],
                    world_size=1)
    with pytest.raises(ConfigError, match="need eval.fid_ref"):
        load_config(overrides=["eval.fid_every=5", "eval.fid_sfid=true"], world_size=1)
    ok = _ref_batch(tmp_path / "adm.npz")
    cfg = load_config(overrides=["eval.fid_every=5", f"eval.fid_ref={ok}", "eval.fid_sfid=true",
                                 "eval.fid_precision_recall=true"], world_size=1)
    assert cfg.eval.fid_sfid and cfg.eval.fid_precision_recall


def _trainer(cfg, model, info, logged):
    return types.SimpleNamespace(cfg=cfg, info=info, device=torch.device("cpu"), ema=None, engine=model, model=model,
                                 step=3, progress=lambda: {"images_seen": 24, "train_flops": 1e9},
                                 metrics=types.SimpleNamespace(log=lambda step, rec: logged.append((step, rec))))


@pytest.mark.slow
def test_in_training_sfid_precision_recall_with_one_tokenizer(tmp_path, single_rank, monkeypatch):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
    import heptapod_ds.tokenizers as tokenizers
    from heptapod_ds.model import build_model
    from heptapod_ds.training.evaluate import fid_during_training, sample_and_score
    from model_helpers import tiny_cfg

    built = []
    real = tokenizers.build_tokenizer
    monkeypatch.setattr(tokenizers, "build_tokenizer", lambda c, **kw: built.append(1) or real(c, **kw))
    ref = _ref_batch(tmp_path / "adm.npz")
    cfg = tiny_cfg("discrete", "next", **{"eval.fid_every": 1, "eval.fid_samples": 10, "eval.fid_ref": ref,
                                          "eval.fid_sfid": True, "eval.fid_precision_recall": True,
                                          "sampling.eval_per_class": 1, "run_dir": str(tmp_path / "run")})
    torch.manual_seed(0)
    model = build_model(cfg)
    logged = []
    trainer = _trainer(cfg, model, single_rank, logged)
    out = fid_during_training(trainer)
    assert out["fid"] > 0 and out["sfid"] > 0 and 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1
    assert logged[0][1]["sfid"] == out["sfid"] and logged[0][1]["precision"] == out["precision"]
    cache = tmp_path / "run" / "fid_ref_features.npz"
    with np.load(cache) as z:
        assert z["pool"].shape == (6, 2048)
    sample_and_score(trainer, final=False)
    assert built == [1], "the tokenizer is built once per trainer, for every evaluation"
    assert (tmp_path / "run" / "samples_step0000003.png").is_file()


def test_generate_decodes_only_on_rank_0(monkeypatch):
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.training import evaluate

    calls = []

    class Model:
        def generate(self, labels, seeds):
            calls.append(len(labels))
            return torch.zeros(len(labels), 64, dtype=torch.long)

    engine = types.SimpleNamespace(eval=lambda: None, train=lambda: None)
    cfg = types.SimpleNamespace(sampling=types.SimpleNamespace(seed=0, use_ema=False, batch_size=4))
    trainer = types.SimpleNamespace(cfg=cfg, info=types.SimpleNamespace(dp_size=1, dp_rank=0), model=Model(),
                                    engine=engine, ema=None, device=torch.device("cpu"))
    monkeypatch.setattr(evaluate, "_tokenizer", lambda t: pytest.fail("rank 1 decoded images it never uses"))
    monkeypatch.setattr(parallel_state, "is_rank0", lambda: False)
    assert evaluate._generate(trainer, torch.arange(6)) is None and calls == [4, 2]


def test_gather_hands_nccl_a_tensor_on_the_cuda_device(monkeypatch):
    """``training/evaluate.py`` gathered a host tensor over the data-parallel group: under NCCL that fails on
    the first GPU run. Here the group claims to be NCCL and every tensor is fake (FakeTensorMode lets the CPU
    build make CUDA tensors): what reaches ``all_gather`` must be on cuda:0."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.training import evaluate

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_gather", lambda parts, x, group=None: seen.append((x.device, {p.device for p in parts})))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(parallel_state, "dp_group", lambda: "dp-group")
    cuda0 = torch.device("cuda", 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.zeros(3, 8, 8, 3, dtype=torch.uint8)        # the host images of fid_during_training
        out = evaluate._gather_dp(evaluate._pad_to(images, 3))
    assert seen == [(cuda0, {cuda0})]
    assert out.shape == (6, 8, 8, 3) and out.device == torch.device("cpu")


def _gather_body(rank, world_size):
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.distributed.launch_env import LaunchEnv
    from heptapod_ds.evaluation.collectives import gather_rows
    from heptapod_ds.training.evaluate import _gather_dp

    env = LaunchEnv(rank, world_size, rank, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), "torchrun")
    parallel_state.initialize(tensor=1, pipeline=1, seed=0, launch=env)
    rows = torch.arange(5 * (rank + 1) * 3, dtype=torch.float32).reshape(-1, 3) + 100 * rank  # 5 and 10 rows
    return _gather_dp(torch.full((2, 2), float(rank))), gather_rows(rows, parallel_state.dp_group())


@pytest.mark.slow
def test_gathers_on_two_ranks():
    from dist_harness import run_ranks

    (eq0, rows0), (eq1, rows1) = run_ranks(_gather_body, world_size=2, timeout=300)
    assert torch.equal(eq0, eq1) and eq0[:, 0].tolist() == [0, 0, 1, 1]
    assert rows1 is None and rows0.shape == (15, 3)
    assert torch.equal(rows0[:5], torch.arange(15.0).reshape(5, 3))
    assert torch.equal(rows0[5:], torch.arange(30.0).reshape(10, 3) + 100)
