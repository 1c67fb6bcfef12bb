"""tools/ablate.py --quick end to end on two tiny variants x 20 steps: the table and the plots; then the
same grid interrupted by SIGTERM and resumed by calling the tool again logs identical scores."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GRID = os.path.join(HERE, "tiny_grid.yaml")
FAULTS = os.path.join(REPO, "tests", "training", "train_with_faults.py")
REQUEUE = 75


def _ablate(*args, fault=None, timeout=1500):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HEPTAPOD_FAULT"):
        env.pop(k, None)
    if fault:
        env["HEPTAPOD_FAULT"] = fault
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "ablate.py"), GRID, "--quick", *args],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _evals(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [{k: v for k, v in r.items() if k != "sample_s"} for r in rows if "eval_samples" in r]


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "out"
    proc = _ablate("--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_quick_grid_writes_table_and_plots(full_grid):
    out, proc = full_grid
    assert "[2/2] global_tiny/seed0: done" in proc.stdout
    report = (out / "report.md").read_text()
    for name in ("next_tiny", "global_tiny"):
        assert f"| `{name}` |" in report and f"| `{name}/seed0` | done | 20 | 2 |" in report
    assert "class-consistency ↑ final" in report and "At equal training compute" in report
    plots = sorted(p.name for p in (out / "report_plots").iterdir())
    assert plots == ["class_consistency_vs_flops.png", "class_consistency_vs_steps.png",
                     "frechet_distance_vs_flops.png", "frechet_distance_vs_steps.png"]
    for p in plots:
        assert (out / "report_plots" / p).stat().st_size > 10_000
        assert f"](report_plots/{p})" in report
    # Each run: one evaluation record every 10 steps, with the progress it was made at.
    for name, evals in (("next_tiny", _evals(out / "next_tiny" / "seed0")),
                        ("global_tiny", _evals(out / "global_tiny" / "seed0"))):
        assert [e["step"] for e in evals] == [10, 20], name
        assert [e["images_seen"] for e in evals] == [160, 320]
        assert evals[1]["train_flops"] == pytest.approx(2 * evals[0]["train_flops"])
        assert all(0 <= e["class_consistency"] <= 1 and e["frechet_distance"] > 0 for e in evals)
    # A second call finds everything finished and reruns nothing.
    again = _ablate("--out", str(out))
    assert again.returncode == 0 and again.stdout.count("finished before, skipped") == 2, again.stdout[-2000:]


def test_interrupted_and_resumed_grid_logs_identical_scores(full_grid, tmp_path):
    ref_out, _ = full_grid
    out = tmp_path / "cut"
    stopped = _ablate("--out", str(out), "--only", "global_tiny", "--launcher", f"{sys.executable} {FAULTS}",
                      fault="sigterm_after_step:13")
    assert stopped.returncode == REQUEUE, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    run = out / "global_tiny" / "seed0"
    assert (run / "checkpoints" / "latest").read_text().strip() == "global_step13"
    assert not (run / "summary.json").exists()
    resumed = _ablate("--out", str(out), "--only", "global_tiny")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    attempts = json.loads((run / "ablate_run.json").read_text())["attempts"]
    assert [(a["rc"], a["state_before"]) for a in attempts] == [(REQUEUE, "new"), (0, "partial")]
    ref = _evals(ref_out / "global_tiny" / "seed0")
    assert _evals(run) == ref  # scores, images seen and FLOPs at steps 10 and 20, bit for bit
    a = json.loads((ref_out / "global_tiny" / "seed0" / "summary.json").read_text())
    b = json.loads((run / "summary.json").read_text())
    for key in ("class_consistency", "frechet_distance", "final_loss", "images_seen", "train_flops"):
        assert a[key] == b[key], key
