"""train.py under model parallelism, end to end on the digits: TP=2 (training, checkpoint, sampling and
scoring), and PP=2 stopped by SIGTERM after step 3 of 8 then resumed with resume=auto: the same losses
and bit-identical parameters as the uninterrupted PP=2 run."""
import os

import pytest
import torch

from dist_harness import run_script
from test_train_e2e import FAULTS, REPO, REQUEUE, SMALL, _env, _losses

pytestmark = pytest.mark.slow


def _launch(run_dir, world, *overrides, fault=None):
    env = _env(**({"HEPTAPOD_FAULT": fault} if fault else {}))
    return run_script([FAULTS, f"run_dir={run_dir}", *SMALL, *overrides], world_size=world, timeout=600,
                      env=env, cwd=REPO)


def _ok(procs, code=0):
    for r, p in enumerate(procs):
        assert p.returncode == code, f"rank {r}: exit {p.returncode} (wanted {code})\n{p.stdout[-4000:]}"


def _stage_params(run_dir, step):
    """Model parameters of a PP checkpoint: the stages' files joined (names are the whole model's)."""
    from heptapod_ds.pipeline.stage import merge_stage_state_dicts

    tag = os.path.join(run_dir, "checkpoints", f"global_step{step}")
    stages = sorted(d for d in os.listdir(tag) if d.startswith("pp_stage"))
    dicts = []
    for d in stages:
        sd = torch.load(os.path.join(tag, d, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
        dicts.append({k: v for k, v in sd["module"].items() if torch.is_tensor(v)})
    return merge_stage_state_dicts(dicts)


def test_train_py_tensor_parallel_2(tmp_path):
    run = tmp_path / "tp2"
    procs = _launch(run, 2, "parallel.tensor=2", "parallel.zero_stage=1", "train.steps=3",
                    "sampling.eval_per_class=1", "sampling.batch_size=100")
    _ok(procs)
    out = procs[0].stdout
    assert "tp=2 pp=1 dp=1" in out
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3] and all(v == v for v in losses.values())
    assert (run / "samples.png").stat().st_size > 0
    assert (run / "checkpoints" / "global_step3" / "mp_rank_01_model_states.pt").is_file()  # TP rank 1's shard


def test_pp2_exact_resume_after_sigterm(tmp_path):
    common = ["parallel.pipeline=2", "parallel.zero_stage=1", "train.micro_batch_size=4", "train.steps=8",
              "checkpoint.save_every=100"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    full = _launch(ref, 2, *common)
    _ok(full)
    assert "pipeline split over 2 stages (auto)" in full[0].stdout and "1F1B bubble with 4 micro-batches" in \
        full[0].stdout
    stopped = _launch(cut, 2, *common, fault="sigterm_after_step:3")
    _ok(stopped, REQUEUE)  # every rank saves and exits 75
    assert (cut / "checkpoints" / "latest").read_text().strip() == "global_step3"
    assert sorted(os.listdir(cut / "checkpoints" / "global_step3" / "pp_stage01")) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    _ok(_launch(cut, 2, *common))
    assert _losses(cut) == _losses(ref) and sorted(_losses(ref)) == list(range(1, 9))
    a, b = _stage_params(ref, 8), _stage_params(cut, 8)
    assert a.keys() == b.keys() and any(k.startswith("output.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs after resume"
