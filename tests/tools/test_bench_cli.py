"""python -m heptapod_ds.bench: bad rows are refused, and --quick prints every row."""
import json
import os
import subprocess
import sys

import pytest


def test_unknown_row_is_refused(repo_root):
    out = subprocess.run([sys.executable, "-m", "heptapod_ds.bench", "--only", "speed"], cwd=repo_root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown row(s) ['speed']" in out.stderr


@pytest.mark.slow
def test_quick_bench_prints_every_row(tmp_path, repo_root):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    proc = subprocess.run([sys.executable, "-m", "heptapod_ds.bench", "--quick", "--json", str(out_json)],
                          cwd=repo_root, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    names = [r["row"] for r in data["rows"]]
    for prefix in ("train/small/reference", "train/small/zero0", "train/small/zero3", "mfu/matmul_peak",
                   "sampling/tiny/kv_cache", "sampling/tiny-patch/no_cache", "memory/tiny/zero0", "memory/tiny/zero3",
                   "loader/kl16/workers1", "loader/vq16/workers1", "gpu/cpu", "head/tiny/local_train",
                   "head/tiny/local_sampling"):
        assert prefix in names, f"row {prefix} missing from {names}"
        assert prefix in proc.stdout
    rows = {r["row"]: r for r in data["rows"]}
    z0 = rows["train/small/zero0"]
    assert abs(z0["first_loss"] - rows["train/small/reference"]["first_loss"]) <= 1e-5 * abs(z0["first_loss"])
    # the local head's cut computes fewer slots and samples the uncut head's tokens
    head_train, head_sampling = rows["head/tiny/local_train"], rows["head/tiny/local_sampling"]
    assert head_train["computed_slots_per_image"]["cut"] < head_train["computed_slots_per_image"]["uncut"]
    assert head_sampling["same_tokens"] and head_sampling["head_flops_per_image"]["cut"] < \
        head_sampling["head_flops_per_image"]["uncut"]
    mem = {s: rows[f"memory/tiny/zero{s}"] for s in range(4)}
    # (ranks may differ by DeepSpeed's partition padding, so rank 0's bytes are compared)
    # ZeRO-3 partitions parameters, gradients and optimizer state over the 2 ranks
    assert mem[3]["params_bytes"] < 0.6 * mem[0]["params_bytes"]
    assert mem[3]["grads_bytes"] < 0.6 * mem[0]["grads_bytes"]
    # fp32 on CPU: ZeRO 1-3 keep an fp32 master partition that ZeRO-0 does not need, so the optimizer
    # shrinks from 2 to 1.5 parameter copies per rank at DP=2
    for stage in (1, 2, 3):
        assert mem[stage]["optimizer_bytes"] < 0.8 * mem[0]["optimizer_bytes"]
    assert mem[3]["total_bytes"] < 0.7 * mem[0]["total_bytes"]
