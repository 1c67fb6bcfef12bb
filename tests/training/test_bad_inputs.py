"""Bad input files and arguments: a clear error (exit 2) before any process group exists, run_dir untouched.

Every case runs train.py as rank 0 of a 2-rank world with no rank 1: had it started a process group, it
would wait for the missing rank until the test's timeout."""
import json
import os
import subprocess
import sys

import pytest

from heptapod_ds.config import load_config
from heptapod_ds.distributed.launch_env import free_port

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "heptapod_ds", "train.py")
BASE = ["train.micro_batch_size=32", "train.global_batch_size=64", "train.steps=2"]  # 2 ranks x 32


def _run(run_dir, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK",)}
    env.update(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, TRAIN, f"run_dir={run_dir}", *BASE, *args], capture_output=True,
                       text=True, timeout=900, env=env, cwd=REPO)
    assert not os.path.exists(run_dir), f"{run_dir} was created: {os.listdir(run_dir)}"
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stderr


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """The digits as a pixel beton and as a patch beton, and a beton without the flip and index fields."""
    from heptapod_ds.data import ensure_dataset

    cache = tmp_path_factory.mktemp("cache")
    pixel = ensure_dataset(load_config(overrides=[f"data.cache_dir={cache}"], world_size=1))
    patch = ensure_dataset(load_config(overrides=[f"data.cache_dir={cache}", "tokenizer.name=patch",
                                                  "tokenizer.channels=1"], world_size=1))
    return {"pixel": pixel, "patch": patch, "partial": _partial_beton(cache / "partial.beton")}


def _partial_beton(path):
    """A beton with codes and labels only (no codes_flip, no index), and a valid summary."""
    import numpy as np
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    from heptapod_ds.config.schema import TokenizerConfig
    from heptapod_ds.data.format import FORMAT_VERSION, sha256_file, tokenizer_record, write_summary

    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 17, (8, 8)).astype(np.int16), int(i % 10)) for i in range(128)]
    DatasetWriter(str(path), {"codes": NDArrayField(np.dtype(np.int16), (8, 8)), "label": IntField()},
                  num_workers=1).from_indexed_dataset(rows)
    write_summary(str(path), {"format_version": FORMAT_VERSION, "count": 128, "file_size": os.path.getsize(path),
                              "sha256": sha256_file(str(path)), "tokenizer": tokenizer_record(TokenizerConfig())})
    return str(path)


def test_beton_of_another_tokenizer(betons, tmp_path):
    err = _run(tmp_path / "run", f"data.path={betons['patch']}")
    assert f"beton '{betons['patch']}' was written with tokenizer 'patch' but the config uses " \
           f"tokenizer.name=pixel. Point data.path at a beton for pixel or change tokenizer.name." in err


def test_beton_of_another_image_size(betons, tmp_path):
    # the same 8x8 grid from 16 px at stride 2: only the recorded tokenizer settings tell them apart
    err = _run(tmp_path / "run", f"data.path={betons['pixel']}", "tokenizer.image_size=16", "tokenizer.stride=2")
    assert "was written with other tokenizer settings than the config: tokenizer.image_size: beton 8, config 16; " \
           "tokenizer.stride: beton 1, config 2. Set these tokenizer.* fields to the beton's values" in err


def test_beton_with_missing_fields(betons, tmp_path):
    err = _run(tmp_path / "run", f"data.path={betons['partial']}")
    assert "lacks the field(s) ['codes_flip', 'index'] (it has ['codes', 'label'])" in err
    assert "re-run it (with --force)" in err


def test_yaml_with_a_typo_in_a_nested_key(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("train:\n  steps: 5\n  warmup: 3\nschedule:\n  decay: cosine\n")
    err = _run(tmp_path / "run", "--config", str(cfg))
    assert "unknown config key 'train.warmup'. Did you mean 'schedule.warmup_steps'?" in err
    cfg.write_text("optimizer:\n  lr: 0.001\n  betas1: 0.9\n")
    assert "unknown config key 'optimizer.betas1'. Did you mean 'optimizer.beta1'?" in _run(
        tmp_path / "run", "--config", str(cfg))


def test_bare_leaf_name_on_the_command_line(tmp_path):
    assert "unknown config key 'resume'. Did you mean 'checkpoint.resume'?" in _run(tmp_path / "run", "resume=auto")
    err = _run(tmp_path / "run", "seed=3")
    assert "unknown config key 'seed'. Did you mean one of 'data.seed', 'train.seed', 'sampling.seed'?" in err


def test_ds_config_contradicting_the_config(tmp_path):
    ds = tmp_path / "mine.json"
    ds.write_text(json.dumps({"train_batch_size": 128, "train_micro_batch_size_per_gpu": 32,
                              "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
                              "zero_optimization": {"stage": 1}}))
    err = _run(tmp_path / "run", "--ds_config", str(ds))
    assert "DeepSpeed config does not match the training config" in err
    assert f"DeepSpeed config '{ds}' sets \"train_batch_size\": 128 but train.global_batch_size=64" in err
    assert "pass train.global_batch_size=128" in err
    assert "\"gradient_accumulation_steps\": 2 but train.grad_accum=1" in err
    assert "sets bf16.enabled=true but parallel.precision=auto resolves to fp32" in err


def test_explicit_resume_path_that_does_not_exist(tmp_path):
    err = _run(tmp_path / "run", f"checkpoint.resume={tmp_path}/nowhere")
    assert f"checkpoint.resume='{tmp_path}/nowhere' is not a complete checkpoint" in err
