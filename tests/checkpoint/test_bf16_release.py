"""bf16 checkpoints of every ZeRO stage release and reshard from the fp32 master weights, not from the bf16
module copies (which a bf16 ZeRO-0 checkpoint's module file holds): the released weights are fp32 values that
bf16 cannot hold, whose bf16 roundings are the module copies; a reshard carries them exactly."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["backbone.depth=1", "backbone.width=32", "backbone.num_heads=2", "head.depth=1", "head.width=32",
         "head.num_heads=2", "head.timesteps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
         "train.ema_decay=0", "train.steps=2", "checkpoint.save_every=2", "sampling.eval_per_class=0",
         "logging.progress_bar=false", "data.num_workers=1", "parallel.precision=bf16", "optimizer.lr=1e-2"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    runs = {}
    for zero in (0, 1, 2, 3):
        run = tmp / f"zero{zero}"
        proc = subprocess.run([sys.executable, "heptapod_ds/train.py", f"run_dir={run}", *SMALL,
                               f"parallel.zero_stage={zero}"], env=_env(), cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[zero] = run
    return tmp, runs


def _release(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def _not_bf16(t: torch.Tensor) -> bool:
    return not torch.equal(t, t.to(torch.bfloat16).float())


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_bf16_release_holds_the_fp32_master(bf16_runs, zero, single_rank):
    from heptapod_ds.checkpoint.cli import main
    from heptapod_ds.checkpoint.reader import TrainingCheckpoint

    tmp, runs = bf16_runs
    out = tmp / f"rel{zero}"
    assert main(["to-release", "--ckpt", str(runs[zero]), "--out", str(out), "--weights", "raw"]) == 0
    released = _release(out)
    assert {str(v.dtype) for v in released.values()} == {"torch.float32"}
    matrices = [k for k, v in released.items() if v.dim() == 2]
    # trained at lr 1e-2 for 2 steps: an fp32 master is off the bf16 grid; bf16 copies written as fp32 are on it
    assert sum(_not_bf16(released[k]) for k in matrices) == len(matrices), \
        [k for k in matrices if not _not_bf16(released[k])][:5]
    tag = runs[zero] / "checkpoints" / "global_step2"
    if zero < 3:  # the module file holds whole bf16 copies: they are the masters' roundings
        module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        for name, value in released.items():
            assert torch.equal(value.to(torch.bfloat16), module[name].to(torch.bfloat16)), name
    # and a reshard into another layout carries the same master, moments included
    target = tmp / f"reshard{zero}"
    other = 1 if zero != 1 else 2
    assert main(["reshard", "--ckpt", str(runs[zero]), "--out", str(target), "--zero", str(other), "--dp", "1",
                 "--tensor", "1"]) == 0
    src, dst = TrainingCheckpoint(tag), TrainingCheckpoint(target / "checkpoints" / "global_step2")
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        a, b = src.tensors(kind), dst.tensors(kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind
    assert all(torch.equal(src.tensors("fp32")[k], released[k]) for k in released)
