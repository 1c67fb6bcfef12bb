"""A checkpoint of another model or layout is refused, naming every difference; partial saves are skipped."""
import pytest

from heptapod_ds.config import load_config, to_dict
from heptapod_ds.engine import CheckpointManager, CheckpointMismatch


def _cfg(tmp_path, *overrides):
    return load_config(overrides=[f"run_dir={tmp_path}", *overrides], world_size=1)


def _meta(cfg):
    return {"config": to_dict(cfg), "layout": {"tensor": 1, "pipeline": 1, "dp": 1, "zero_stage": 0}}


def test_other_tokenizer_and_shape_are_named(single_rank, tmp_path):
    saved = _cfg(tmp_path, "tokenizer.vocab_size=33", "backbone.width=64")
    manager = CheckpointManager(_cfg(tmp_path))
    with pytest.raises(CheckpointMismatch) as e:
        manager.check_compatible(_meta(saved), tmp_path / "global_step5")
    msg = str(e.value)
    assert "tokenizer.vocab_size: checkpoint 33, this run 17" in msg
    assert "backbone.width: checkpoint 64, this run 128" in msg
    assert "checkpoint.resume=none" in msg


def test_other_preset_and_layout_are_refused(single_rank, tmp_path):
    manager = CheckpointManager(_cfg(tmp_path))
    meta = _meta(_cfg(tmp_path))
    meta["config"]["preset"] = "B"
    with pytest.raises(CheckpointMismatch, match="preset: checkpoint 'B', this run 'tiny'"):
        manager.check_compatible(meta, tmp_path)
    meta = _meta(_cfg(tmp_path))
    meta["layout"]["zero_stage"] = 3
    with pytest.raises(CheckpointMismatch, match="zero_stage: checkpoint 3, this run 0"):
        manager.check_compatible(meta, tmp_path)
    manager.check_compatible(_meta(_cfg(tmp_path, "train.steps=7")), tmp_path)  # training length may change


def test_head_positions_are_identity_and_older_checkpoints_held_the_learned_table(single_rank, tmp_path):
    manager = CheckpointManager(_cfg(tmp_path))
    with pytest.raises(CheckpointMismatch, match="head.pos_embed: checkpoint 'rope2d', this run 'learned'"):
        manager.check_compatible(_meta(_cfg(tmp_path, "head.pos_embed=rope2d")), tmp_path)
    older = _meta(_cfg(tmp_path))
    del older["config"]["head"]["pos_embed"]  # written before the field existed
    manager.check_compatible(older, tmp_path)
    with pytest.raises(CheckpointMismatch, match="head.pos_embed: checkpoint 'learned', this run 'rope2d'"):
        CheckpointManager(_cfg(tmp_path, "head.pos_embed=rope2d")).check_compatible(older, tmp_path)


def test_discovery_ignores_incomplete_and_staging_dirs(tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path}"], world_size=1)
    root = tmp_path / "checkpoints"
    for name, complete in [("global_step2", True), ("global_step10", True), ("global_step12", False),
                           (".staging-global_step14", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "heptapod_meta.json").write_text("{}")
    manager = CheckpointManager(cfg)
    assert [p.name for p in manager.complete_checkpoints()] == ["global_step2", "global_step10"]
    assert manager.latest().name == "global_step10"
    assert manager._resume_target().name == "global_step10"


def test_explicit_resume_path_must_exist(tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path}", f"checkpoint.resume={tmp_path}/nope"], world_size=1)
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint"):
        CheckpointManager(cfg)._resume_target()
    cfg.checkpoint.resume = "none"
    assert CheckpointManager(cfg)._resume_target() is None
