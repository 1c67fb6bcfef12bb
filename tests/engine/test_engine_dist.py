"""Acceptance of the engine with the stand-in model: ZeRO-3 == ZeRO-0, exact resume, crash-safe saves."""
import json
import os

import numpy as np
import pytest

from dist_harness import run_ranks
from engine_standin import run_training

pytestmark = pytest.mark.slow

DS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "ds_configs")

BASE = ["train.global_batch_size=8", "optimizer.lr=0.01", "schedule.warmup_steps=2", "train.steps=10",
        "train.ema_decay=0.9", "optimizer.weight_decay=0.1", "optimizer.grad_clip=0.5"]


def _body(rank, world_size, overrides, until_step, kwargs):
    return run_training(overrides, until_step, **kwargs)


def _run(world_size, overrides, until_step, timeout=240, **kwargs):
    return run_ranks(_body, world_size, args=(overrides, until_step, kwargs), timeout=timeout)


def _assert_close(a, b, rtol):
    assert a.keys() == b.keys()
    for name in a:
        err = float(np.linalg.norm(a[name] - b[name]) / max(np.linalg.norm(b[name]), 1e-12))
        assert err <= rtol, f"{name}: relative difference {err:.3g} > {rtol}"


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs"


def _zero3_both_persistence_modes(rank, world_size, tmp, ds_json):
    """ZeRO-3 with the shipped config (small parameters stay gathered) and with none kept gathered."""
    cfg = BASE + ["parallel.zero_stage=3", "train.micro_batch_size=4", "checkpoint.resume=none"]
    kept = run_training(cfg + [f"run_dir={tmp}/z3"], 5)
    released = run_training(cfg + [f"run_dir={tmp}/z3r", f"parallel.ds_config={ds_json}"], 5)
    return kept, released


def test_zero3_two_ranks_matches_zero0_one_rank(tmp_path, repo_root):
    ds = json.loads((repo_root / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "z3_release.json").write_text(json.dumps(ds))
    z3, z3r = zip(*run_ranks(_zero3_both_persistence_modes, 2,
                             args=(str(tmp_path), str(tmp_path / "z3_release.json")), timeout=300))
    for rank in range(2):
        _assert_equal(z3r[rank]["params"], z3[rank]["params"])
        _assert_equal(z3r[rank]["ema"], z3[rank]["ema"])
    z0 = _run(1, BASE + ["parallel.zero_stage=0", "train.micro_batch_size=8", f"run_dir={tmp_path}/z0",
                         "checkpoint.resume=none"], 5)
    _assert_equal(z3[0]["params"], z3[1]["params"])
    _assert_close(z3[0]["params"], z0[0]["params"], rtol=1e-5)
    _assert_close(z3[0]["ema"], z0[0]["ema"], rtol=1e-5)
    for step in range(5):
        assert abs(z3[0]["losses"][step] - z0[0]["losses"][step]) <= 1e-5 * abs(z0[0]["losses"][step])
    # the run really trained, and the EMA lags behind the weights
    assert z0[0]["losses"][4] < z0[0]["losses"][0]
    assert any(not np.allclose(z0[0]["ema"][n], z0[0]["params"][n]) for n in z0[0]["params"])


def _full_then_preempted(rank, world_size, cfg, tmp):
    full = run_training(cfg + [f"run_dir={tmp}/full", "checkpoint.resume=none"], 10)
    first = run_training(cfg + [f"run_dir={tmp}/split"], 10, signal_rank_at=(1, 5))
    return full, first


def test_preempt_and_resume_is_exact_under_zero3(tmp_path):
    cfg = BASE + ["parallel.zero_stage=3", "train.micro_batch_size=2", "train.grad_accum=2"]
    # one launch: the uninterrupted reference, then a run in which rank 1 alone gets SIGUSR1 after
    # step 5; both ranks must stop there and save
    full, first = zip(*run_ranks(_full_then_preempted, 2, args=(cfg, str(tmp_path)), timeout=300))
    assert [r["step"] for r in first] == [5, 5]
    assert first[1]["stopped_by"] == "SIGUSR1"
    second = _run(2, cfg + [f"run_dir={tmp_path}/split"], 10)
    for rank in range(2):
        assert second[rank]["losses"] == full[rank]["losses"]
        _assert_equal(second[rank]["params"], full[rank]["params"])
        _assert_equal(second[rank]["ema"], full[rank]["ema"])


def test_sigkill_while_saving_resumes_from_previous_checkpoint(tmp_path):
    cfg = BASE + ["parallel.zero_stage=0", "train.micro_batch_size=8", "checkpoint.save_every=2",
                  "checkpoint.keep_last=2"]
    run_dir = tmp_path / "crash"
    with pytest.raises(AssertionError, match="exit code -9"):
        _run(1, cfg + [f"run_dir={run_dir}"], 6, kill_in_save_at=4)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step2"
    assert not (ckpts / "global_step4").exists() and (ckpts / ".staging-global_step4").exists()
    resumed = _run(1, cfg + [f"run_dir={run_dir}"], 6)[0]
    full = _run(1, cfg + [f"run_dir={tmp_path}/full", "checkpoint.resume=none"], 6)[0]
    assert resumed["losses"] == full["losses"]
    _assert_equal(resumed["params"], full["params"])
    _assert_equal(resumed["ema"], full["ema"])
    assert sorted(os.listdir(ckpts)) == ["global_step4", "global_step6", "latest"]


NONFINITE_CASES = {"0": ["parallel.zero_stage=0"], "2": ["parallel.zero_stage=2"],
                   "3": ["parallel.zero_stage=3"],
                   "3-offload": ["parallel.zero_stage=3", f"parallel.ds_config={DS_DIR}/zero3_offload.json"]}


def _nonfinite_body(rank, world_size, tmp):
    out = {}
    for stage, extra in NONFINITE_CASES.items():
        cfg = BASE + extra + ["train.micro_batch_size=4", "train.grad_accum=2", "checkpoint.resume=none"]
        # a NaN in the first micro batch skips before any backward; in the second it must discard the
        # gradients of the first: both must give the same trajectory
        a = run_training(cfg + [f"run_dir={tmp}/a{stage}"], 4, poison=[(2, 0)])
        b = run_training(cfg + [f"run_dir={tmp}/b{stage}"], 4, poison=[(2, 1)])
        out[stage] = (a, b)
    try:
        run_training(BASE + ["parallel.zero_stage=3", "train.micro_batch_size=8", "train.max_nonfinite=3",
                             "checkpoint.resume=none", f"run_dir={tmp}/stop"], 6, poison=[(3, 0, 100)])
    except Exception as e:  # noqa: BLE001 - returned to the test
        out["stop"] = f"{type(e).__name__}: {e}"
    return out


def test_nonfinite_loss_skips_cleanly_and_stops_after_m_in_a_row(tmp_path):
    out = run_ranks(_nonfinite_body, 1, args=(str(tmp_path),), timeout=300)[0]
    for stage in NONFINITE_CASES:
        a, b = out[stage]
        assert a["skipped"] == b["skipped"] == 1
        assert a["losses"] == b["losses"]
        _assert_equal(a["params"], b["params"])
        _assert_equal(a["ema"], b["ema"])
    assert out["stop"].startswith("NonFiniteLossError: 3 non-finite losses in a row at step 3")
    assert (tmp_path / "stop" / "checkpoints" / "global_step3" / "heptapod_meta.json").is_file()


def _model_parallel_resume(rank, world_size, tmp, layout):
    cfg = BASE + layout + ["parallel.zero_stage=1", "train.micro_batch_size=8"]
    full = run_training(cfg + [f"run_dir={tmp}/full", "checkpoint.resume=none"], 4)
    run_training(cfg + [f"run_dir={tmp}/split", "checkpoint.resume=none"], 2)
    resumed = run_training(cfg + [f"run_dir={tmp}/split"], 4)  # a fresh engine resumes the shards
    return full, resumed


def test_pipeline_stages_keep_separate_checkpoint_files(tmp_path):
    # each stage holds its own (here independent) model: a shared file name would mix the two stages
    out = run_ranks(_model_parallel_resume, 2, args=(str(tmp_path), ["parallel.pipeline=2"]), timeout=300)
    for full, resumed in out:
        assert resumed["losses"] == full["losses"]
        _assert_equal(resumed["params"], full["params"])
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints" / "global_step4")) == [
        "heptapod_meta.json", "heptapod_rank00000.pt", "heptapod_rank00001.pt", "pp_stage00", "pp_stage01"]


def test_tensor_parallel_shards_resume_exactly(tmp_path):
    out = run_ranks(_model_parallel_resume, 2, args=(str(tmp_path), ["parallel.tensor=2"]), timeout=300)
    for full, resumed in out:
        assert resumed["losses"] == full["losses"]
        _assert_equal(resumed["params"], full["params"])
        _assert_equal(resumed["ema"], full["ema"])
    (full0, _), (full1, _) = out
    assert full0["params"]["fc1.weight"].shape == (32, 16)  # column-parallel: half of 64 rows per rank
    assert not np.array_equal(full0["params"]["fc1.weight"], full1["params"]["fc1.weight"])
    _assert_equal({"n": full0["params"]["norm1.weight"]}, {"n": full1["params"]["norm1.weight"]})
