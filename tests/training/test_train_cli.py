import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "heptapod_ds", "train.py")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=120, env=env)


def test_help():
    r = _run("--help")
    assert r.returncode == 0 and "--ds_config" in r.stdout and "key.sub=value" in r.stdout


def test_print_config_with_ds_config_selects_zero_stage():
    r = _run("--ds_config", os.path.join(REPO, "ds_configs", "zero3.json"), "--print-config", "train.steps=7")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["parallel"]["zero_stage"] == 3 and cfg["train"]["steps"] == 7
    assert cfg["parallel"]["ds_config"].endswith("zero3.json")


def test_conflicting_stage_and_bad_config_exit_2():
    r = _run("--ds_config", os.path.join(REPO, "ds_configs", "zero3.json"), "parallel.pipeline=2", "--print-config")
    assert r.returncode == 2 and "parallel.zero_stage=3: ZeRO-3 gathers" in r.stderr
    r = _run("--ds_config", "missing.json")
    assert r.returncode == 2 and "missing.json" in r.stderr


def test_bad_pipeline_split_refused_before_startup():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["WORLD_SIZE"] = "2"  # a PP=2 layout with a split that does not fit: refused before any process group
    r = subprocess.run([sys.executable, TRAIN, "parallel.pipeline=2", "parallel.pipeline_split=5,5"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "sums to 10 layers; the model has 6" in r.stderr
