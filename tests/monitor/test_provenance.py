"""launches.jsonl records, the exit file the Slurm script reads, and rank-aware logging under srun."""
import json
import logging
import subprocess
import types

import pytest

from heptapod_ds.config import load_config
from heptapod_ds.distributed.launch_env import env_local_rank, env_rank
from heptapod_ds.monitor import provenance, setup_logging

SRUN_ENV = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_JOB_NUM_NODES": "2"}


def test_env_rank_follows_the_launcher():
    assert (env_rank(SRUN_ENV), env_local_rank(SRUN_ENV)) == (3, 1)
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", **SRUN_ENV}  # torchrun inside srun
    assert (env_rank(torchrun), env_local_rank(torchrun)) == (5, 1)
    assert env_rank({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}) == 2
    assert (env_rank({}), env_local_rank({})) == (0, 0)


@pytest.mark.parametrize("procid,level", [("0", logging.INFO), ("1", logging.WARNING)])
def test_logging_level_is_set_from_the_srun_rank(monkeypatch, procid, level):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", procid)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging()
        assert root.level == level
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "m", None, None)
        root.handlers[0].filter(record)
        assert record.rank == int(procid)
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def test_git_state_of_a_checkout(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    if subprocess.run([*git, "init", "-q"]).returncode != 0:
        pytest.skip("git is not usable here")
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "untracked.txt").write_text("not a change of the code")
    assert provenance.git_state(str(repo)) == {"commit": sha, "dirty": False}
    (repo / "a.txt").write_text("2")
    assert provenance.git_state(str(repo)) == {"commit": sha, "dirty": True, "changed": ["a.txt"]}
    out = provenance.git_state(str(tmp_path))  # not a checkout: recorded, not raised
    assert out["commit"] is None and out["dirty"] is None and out["error"]


def test_launch_and_exit_records(tmp_path, monkeypatch):
    for k, v in SRUN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HEPTAPOD_LAUNCH_SCRIPT", "slurm/train_xl.sh train.steps=3")
    monkeypatch.setenv("HEPTAPOD_LAUNCH_COMMAND", "srun --kill-on-bad-exit=1 python heptapod_ds/train.py")
    exit_file = tmp_path / "exit.json"
    monkeypatch.setenv("HEPTAPOD_EXIT_FILE", str(exit_file))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "train.steps=3"], world_size=1)
    info = types.SimpleNamespace(rank=0, world_size=4, tp_size=2, pp_size=1, dp_size=2)
    with provenance.RunRecord(cfg, info, ["train.steps=3"]) as rec:
        rec.finished(75, 2, signal="SIGUSR1")
    with pytest.raises(RuntimeError):
        with provenance.RunRecord(cfg, info, []):
            raise RuntimeError("boom")
    with provenance.RunRecord(cfg, types.SimpleNamespace(rank=1, world_size=4, tp_size=2, pp_size=1, dp_size=2)):
        pass  # rank 1 writes nothing
    launch, exit_, launch2, failed = provenance.read_launches(cfg.run_dir)
    assert launch["event"] == "launch" and launch["slurm"]["job_id"] == "4242" and launch["attempt"] == 1
    assert launch["argv"][-1] == "train.steps=3" and launch["script"].startswith("slurm/train_xl.sh")
    assert launch["command"].startswith("srun ") and launch["layout"] == {"world": 4, "tensor": 2, "pipeline": 1,
                                                                        "data": 2}
    assert launch["config"]["train"]["steps"] == 3 and len(launch["config_sha256"]) == 64
    assert "commit" in launch["git"] and "dirty" in launch["git"]
    assert (exit_["status"], exit_["exit_code"], exit_["step"], exit_["signal"]) == ("preempted", 75, 2, "SIGUSR1")
    assert (exit_["slurm_job_id"], exit_["attempt"]) == ("4242", 1)
    assert failed["status"] == "failed" and "RuntimeError: boom" in failed["error"]
    assert json.loads(exit_file.read_text())["status"] == "failed"  # the newest outcome
    with pytest.raises(ValueError):
        provenance.record_exit(cfg.run_dir, "maybe", 0, 1)
