"""--slurm: the array script (one task per unfinished run) and the submission of array + report job."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GRID = os.path.join(HERE, "tiny_grid.yaml")
sys.path.insert(0, os.path.join(REPO, "tools"))

import ablate  # noqa: E402
from heptapod_ds.experiments import load_grid  # noqa: E402


def _finish(out, name, overrides=(), quick=False):
    """Make run ``name`` look finished, as the tool leaves it."""
    (spec,) = [s for s in load_grid(GRID, overrides).runs(str(out), quick=quick) if s.name == name]
    os.makedirs(spec.run_dir)
    with open(os.path.join(spec.run_dir, "summary.json"), "w") as fh:
        fh.write("{}")
    with open(os.path.join(spec.run_dir, "ablate_run.json"), "w") as fh:
        json.dump({"overrides": list(spec.overrides), "attempts": []}, fh)


def _fake_sbatch(tmp_path):
    """Records its arguments; answers like `sbatch --parsable`."""
    log = tmp_path / "sbatch.log"
    path = tmp_path / "sbatch"
    path.write_text(f"#!/usr/bin/env bash\necho \"$@\" >> {log}\nn=$(wc -l < {log})\necho $((100 + n))\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path), log


def test_array_over_unfinished_runs_and_report_job(tmp_path, capsys):
    out = tmp_path / "out"
    _finish(out, "next_tiny/seed1", ["train.steps=30"])
    sbatch, log = _fake_sbatch(tmp_path)
    rc = ablate.main([GRID, "--out", str(out), "--slurm", "--sbatch", sbatch, "--sbatch-arg=--partition=gpu",
                      "--sbatch-arg=--gpus-per-node=1", "train.steps=30"])
    assert rc == 0, capsys.readouterr()
    script = (out / "ablate_array.sbatch").read_text()
    assert "#SBATCH --array=0,2,3\n" in script  # next_tiny/seed1 is finished
    assert "#SBATCH --partition=gpu\n#SBATCH --gpus-per-node=1\n" in script
    assert f"--output={out}/slurm/%x-%A_%a.out" in script and (out / "slurm").is_dir()
    assert "#SBATCH --open-mode=append\n" in script  # a requeued task's log keeps the earlier attempt
    assert '--task "$SLURM_ARRAY_TASK_ID"' in script and "train.steps=30" in script
    assert 'scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in script
    calls = log.read_text().splitlines()
    assert calls[0] == f"--parsable {out}/ablate_array.sbatch"
    assert "--dependency=afterany:101" in calls[1] and "--partition=gpu" in calls[1]
    assert "--gpus-per-node" not in calls[1] and "--report-only" in calls[1]
    assert "submitted array job 101 and report job 102" in capsys.readouterr().out
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-S", "warning", str(out / "ablate_array.sbatch")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


def test_dry_run_submits_nothing_and_a_finished_grid_has_nothing_to_submit(tmp_path, capsys):
    out = tmp_path / "out"
    assert ablate.main([GRID, "--quick", "--out", str(out), "--slurm", "--dry-run"]) == 0
    assert "#SBATCH --array=0,1\n" in (out / "ablate_array.sbatch").read_text()
    for v in ("next_tiny", "global_tiny"):
        _finish(out, f"{v}/seed0", quick=True)
    assert ablate.main([GRID, "--quick", "--out", str(out), "--slurm", "--dry-run"]) == 2
    assert "every run of the grid is done" in capsys.readouterr().err


def test_missing_sbatch_is_a_clear_error(tmp_path, capsys):
    rc = ablate.main([GRID, "--quick", "--out", str(tmp_path / "o"), "--slurm", "--sbatch", str(tmp_path / "nope")])
    assert rc == 2 and "needs Slurm's sbatch" in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [(["--only", "nope"], "unknown variant"), (["--seeds", "7"], "seeds are"),
                                         (["head.type=bad"], "head.type='bad'")])
def test_bad_arguments_exit_2(tmp_path, capsys, args, match):
    assert ablate.main([GRID, "--out", str(tmp_path / "o"), *args, "--list"]) == 2
    assert match in capsys.readouterr().err
