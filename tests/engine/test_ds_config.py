"""DeepSpeed JSON resolution: 'auto' filled from the training config, conflicts named with the fix."""
import json

import pytest

from heptapod_ds.config import ConfigError, load_config
from heptapod_ds.engine import ds_config


def _cfg(*overrides, world_size=2):
    return load_config(overrides=["train.global_batch_size=16", "train.micro_batch_size=4",
                                  "train.grad_accum=0",
                                  *overrides],
                       world_size=world_size)


def _write(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3_offload", "cpu"])
def test_shipped_files_resolve(repo_root, name):
    stage = {"zero0": 0, "cpu": 0, "zero1": 1, "zero2": 2}.get(name, 3)
    path = repo_root / "ds_configs" / f"{name}.json"
    ds = ds_config.resolve(_cfg(f"parallel.zero_stage={stage}", f"parallel.ds_config={path}"))
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    assert "auto" not in json.dumps(ds)


def test_default_file_follows_zero_stage():
    assert ds_config.resolve(_cfg("parallel.zero_stage=2"))["zero_optimization"]["stage"] == 2


def test_offload_on_cpu_uses_plain_memory(repo_root):
    path = repo_root / "ds_configs" / "zero3_offload.json"
    ds = ds_config.resolve(_cfg("parallel.zero_stage=3", f"parallel.ds_config={path}"))
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert ds_config.is_offload(ds) and ds["zero_force_ds_cpu_optimizer"] is False


def test_conflicting_values_name_both_sides_and_the_fix(tmp_path):
    path = _write(tmp_path, {"train_batch_size": 32, "gradient_clipping": 1.0, "bf16": {"enabled": True},
                             "zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError) as e:
        ds_config.resolve(_cfg(f"parallel.ds_config={path}"))
    msg = str(e.value)
    assert '"train_batch_size": 32 but train.global_batch_size=16' in msg
    assert "pass train.global_batch_size=32" in msg
    assert "zero_optimization.stage=3 but parallel.zero_stage=0" in msg and "parallel.zero_stage=3" in msg
    assert "bf16.enabled=true" in msg and "parallel.precision=bf16" in msg
    assert "gradient_clipping" not in msg  # equal values are fine


def test_optimizer_and_fp16_sections_are_refused(tmp_path):
    path = _write(tmp_path, {"optimizer": {"type": "AdamW"}, "fp16": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"(?s)\"optimizer\" section.*enables fp16"):
        ds_config.resolve(_cfg(f"parallel.ds_config={path}"))


def test_file_overrides_select_the_json_stage(repo_root, tmp_path):
    assert ds_config.file_overrides(repo_root / "ds_configs" / "zero3.json") == ["parallel.zero_stage=3"]
    assert ds_config.file_overrides(_write(tmp_path, {"zero_optimization": {"stage": "auto"}})) == []


def test_bad_json_is_reported(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ds_config.load_json(bad)


def test_unresolved_grad_accum_is_refused():
    cfg = load_config(overrides=["train.grad_accum=0"], validate_config=False)
    with pytest.raises(ConfigError, match="validate the config"):
        ds_config.resolve(cfg, data_parallel_size=1)


def test_pipeline_runs_skip_deepspeeds_common_tag_check():
    cfg = _cfg("parallel.pipeline=2", "backbone.depth=4", world_size=2)
    assert ds_config.resolve(cfg)["checkpoint"]["tag_validation"] == "Ignore"


def test_pipeline_engines_step_once_per_schedule():
    # Megatron's schedule runs the step's micro-batches; each stage's engine sees one batch and steps once
    cfg = _cfg("parallel.pipeline=2", "train.global_batch_size=32", "train.micro_batch_size=4", "train.grad_accum=4",
               world_size=4)
    ds = ds_config.resolve(cfg)
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["train_batch_size"] == 32
    assert "checkpoint" not in ds_config.resolve(_cfg())
