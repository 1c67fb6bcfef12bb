import subprocess
import sys

import yaml


def _run(*args):
    return subprocess.run([sys.executable, "-m", "heptapod_ds.config", *args], capture_output=True, text=True,
                          timeout=120)


def test_prints_resolved_yaml():
    r = _run("preset=tiny", "train.steps=3")
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    assert data["preset"] == "tiny" and data["train"]["steps"] == 3


def test_error_exits_nonzero_with_message():
    r = _run("head.type=banana")
    assert r.returncode != 0
    assert "head.type='banana' is not one of" in r.stderr


def test_help_config_lists_keys():
    r = _run("--help-config")
    assert r.returncode == 0
    assert "backbone.width" in r.stdout and "Hidden size" in r.stdout
