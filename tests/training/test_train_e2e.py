"""train.py end to end on the digits: artefacts and scores, and ZeRO-3 on 2 ranks == ZeRO-0 on 1 rank.

Preemption and crashes of train.py (SIGTERM/SIGUSR1 at a step that is not a save step, SIGKILL at every
point of the save, with bit-identical resumes) are the fault matrix's, tests/faults/; the PP=2 resume is
in test_train_parallel.py."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from dist_harness import run_script
from param_checks import assert_params_close

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FAULTS = os.path.join(HERE, "train_with_faults.py")
REQUEUE = 75  # the trainer's exit status when it stopped for a signal (Slurm requeues it)

# A small model that still exercises every part (global head, EMA, checkpoints) in seconds per step.
SMALL = ["backbone.depth=2", "backbone.width=32", "backbone.num_heads=2", "head.depth=1", "head.width=32",
         "head.num_heads=2", "head.timesteps=2", "head.supervised=4", "train.global_batch_size=16",
         "train.micro_batch_size=16", "train.grad_accum=0", "train.ema_decay=0.9", "optimizer.lr=3e-3",
         "schedule.warmup_steps=2", "data.num_workers=1", "logging.log_every=1", "logging.progress_bar=false",
         "checkpoint.save_every=5", "checkpoint.keep_last=3", "sampling.eval_per_class=0"]


def _env(**extra):
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _train(run_dir, *overrides, fault=None, timeout=600):
    cmd = [sys.executable, FAULTS, f"run_dir={run_dir}", *SMALL, *overrides]
    env = _env(**({"HEPTAPOD_FAULT": fault} if fault else {}))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _ok(proc, code=0):
    assert proc.returncode == code, f"exit {proc.returncode} (wanted {code})\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _params(run_dir, step):
    """fp32 model parameters of checkpoint ``step`` (ZeRO-0 single file or consolidated ZeRO-3 shards)."""
    tag_dir = os.path.join(run_dir, "checkpoints", f"global_step{step}")
    assert os.path.isfile(os.path.join(tag_dir, "heptapod_meta.json")), f"no complete checkpoint {tag_dir}"
    if glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*optim_states.pt")) and \
            json.load(open(os.path.join(tag_dir, "heptapod_meta.json")))["layout"]["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(
            os.path.dirname(tag_dir), tag=f"global_step{step}").items()}
    sd = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in sd["module"].items() if torch.is_tensor(v)}


def test_run_dir_artefacts_and_digits_scores(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "train.steps=6", "sampling.eval_per_class=10", "sampling.batch_size=100")
    _ok(proc)
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 7)) and all(v == v for v in losses.values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in logged)
    assert all(r["images_per_s"] > 0 and r["tokens_per_s"] == 64 * r["images_per_s"] for r in logged)
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["class_consistency"] <= 1.0 and summary["frechet_distance"] > 0
    assert (run / "samples.png").stat().st_size > 0
    assert os.path.isfile(run / "checkpoints" / "global_step6" / "heptapod_meta.json")
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step6"


def _eval_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if "loss" not in r]


def test_zero3_two_ranks_equals_zero0_one_rank(tmp_path):
    """Training and the in-training evaluation (digits metrics every 5 steps, FID at the end): the same records
    from ZeRO-3 on 2 data-parallel ranks (each samples its share) as from one rank."""
    from heptapod_ds.evaluation import save_ref_stats
    import numpy as np

    ref = save_ref_stats(str(tmp_path / "ref.npz"), np.zeros(2048), np.eye(2048) * 0.01)
    evals = ["eval.every=5", "sampling.eval_per_class=2", "eval.fid_every=5", "eval.fid_samples=20",
             f"eval.fid_ref={ref}"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(_train(one, "train.steps=5", "parallel.zero_stage=0", *evals))
    cmd = [FAULTS, f"run_dir={two}", *SMALL, "train.steps=5", "train.micro_batch_size=8", *evals,
           "--ds_config", os.path.join(REPO, "ds_configs", "zero3.json")]
    procs = run_script(cmd, world_size=2, timeout=600, env=_env(), cwd=REPO)
    for p in procs:
        assert p.returncode == 0, p.stdout[-4000:]
    assert_params_close(_params(two, 5), _params(one, 5), "ZeRO-3 on 2 ranks vs ZeRO-0 on 1 rank")
    la, lb = _losses(one), _losses(two)
    assert la.keys() == lb.keys()
    for s in la:
        assert abs(la[s] - lb[s]) <= 1e-5 * max(1.0, abs(la[s])), (s, la[s], lb[s])
    ea, eb = _eval_records(one), _eval_records(two)
    assert ea and [r["step"] for r in ea] == [r["step"] for r in eb], (ea, eb)
    assert any("fid" in r for r in ea), ea
    for a, b in zip(ea, eb):
        assert a.keys() == b.keys(), (a, b)
        for key, value in a.items():
            if key in ("time", "eval_s", "fid_s", "wall_s") or key.endswith("_s"):
                continue  # wall times
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, value, b[key])
            else:
                assert b[key] == value, (key, value, b[key])
