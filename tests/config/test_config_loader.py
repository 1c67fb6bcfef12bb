import textwrap

import pytest

from heptapod_ds.config import ConfigError, from_dict, load_config, to_dict
from heptapod_ds.config.loader import all_keys


def test_defaults_are_the_tiny_demo():
    cfg = load_config(world_size=1)
    assert cfg.preset == "tiny"
    assert cfg.tokenizer.name == "pixel" and cfg.tokenizer.num_tokens == 64
    assert cfg.train.grad_accum == 1  # derived: 64 / (64 x 1)


def test_preset_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(textwrap.dedent("""
        preset: B
        backbone: {depth: 8}
        train: {steps: 7}
    """))
    cfg = load_config(str(f), ["train.steps=9", "optimizer.lr=3e-4", "run_dir=/tmp/x"], world_size=32)
    assert cfg.preset == "B" and cfg.tokenizer.name == "kl16"  # from the preset
    assert cfg.backbone.depth == 8  # file beats preset
    assert cfg.train.steps == 9  # command line beats file
    assert cfg.optimizer.lr == 3e-4 and cfg.run_dir == "/tmp/x"


def test_roundtrip_dict():
    cfg = load_config(overrides=["preset=L"], world_size=32)
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'backbone.widht'.*Did you mean 'backbone.width'"):
        load_config(overrides=["backbone.widht=3"], world_size=1)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optimizer:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.learning_rate'"):
        load_config(str(f), world_size=1)


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian.steps'.*Did you mean 'train.steps'"):
        load_config(overrides=["trian.steps=3"], world_size=1)


def test_wrong_type():
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got str 'many'"):
        load_config(overrides=["train.steps=many"], world_size=1)
    with pytest.raises(ConfigError, match=r"head.depth: expected int, got float"):
        load_config(overrides=["head.depth=1.5"], world_size=1)


def test_int_accepted_for_float_and_str_kept_for_str():
    cfg = load_config(overrides=["optimizer.lr=1", "run_dir=123"], world_size=1)
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.run_dir == "123"


def test_bad_choice():
    with pytest.raises(ConfigError, match=r"head.type='glob' is not one of global, local, next.*'global'"):
        load_config(overrides=["head.type=glob"], world_size=1)


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"unknown preset 'XXL'"):
        load_config(overrides=["preset=XXL"], world_size=1)


def test_heads_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"backbone.num_heads=4 is not divisible by parallel.tensor=3"):
        load_config(overrides=["parallel.tensor=3"], world_size=3)


def test_width_not_divisible_by_tp():
    with pytest.raises(ConfigError, match=r"head.width=100 is not divisible by parallel.tensor=8"):
        load_config(overrides=["head.width=100", "head.num_heads=8", "backbone.num_heads=8", "parallel.tensor=8"],
                    world_size=8)


def test_pipeline_split_is_checked_up_front():
    # any layer count works with auto (stages need not be equal); an explicit split must fit the model
    load_config(overrides=["parallel.pipeline=3"], world_size=3)
    with pytest.raises(ConfigError, match=r"pipeline_split=3,2 sums to 5 layers; the model has 6"):
        load_config(overrides=["parallel.pipeline=2", "parallel.pipeline_split=3,2"], world_size=2)
    with pytest.raises(ConfigError, match=r"lists 3 stages but parallel.pipeline=2"):
        load_config(overrides=["parallel.pipeline=2", "parallel.pipeline_split=2,2,2"], world_size=2)
    with pytest.raises(ConfigError, match=r"every stage but the last needs at least one layer"):
        load_config(overrides=["parallel.pipeline=2", "parallel.pipeline_split=0,6"], world_size=2)
    with pytest.raises(ConfigError, match=r"at most 7 stages"):
        load_config(overrides=["parallel.pipeline=8"], world_size=8)
    with pytest.raises(ConfigError, match=r"neither 'auto' nor a comma-separated list"):
        load_config(overrides=["parallel.pipeline=2", "parallel.pipeline_split=half"], world_size=2)
    cfg = load_config(overrides=["parallel.pipeline=2", "parallel.pipeline_split=[6,0]"], world_size=2)
    assert cfg.parallel.pipeline_split == "[6,0]"


def test_pipeline_split_from_yaml_list(tmp_path):
    path = tmp_path / "pp.yaml"
    path.write_text("parallel:\n  pipeline: 2\n  pipeline_split: [4, 2]\n")
    assert load_config(str(path), world_size=2).parallel.pipeline_split == "4,2"


def test_world_size_not_divisible_by_model_parallel():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by tensor x pipeline = 2 x 2 = 4"):
        load_config(overrides=["parallel.tensor=2", "parallel.pipeline=2"], world_size=6)


def test_pipeline_with_zero3_refused():
    with pytest.raises(ConfigError, match=r"parallel.pipeline=2 with parallel.zero_stage=3: ZeRO-3 gathers .* "
                                          r"deadlocks .* Use parallel.zero_stage=2"):
        load_config(overrides=["parallel.pipeline=2", "parallel.zero_stage=3"], world_size=2)
    # stages 0-2 are fine
    for stage in (0, 1, 2):
        load_config(overrides=["parallel.pipeline=2", f"parallel.zero_stage={stage}"], world_size=2)


def test_batch_product_mismatch():
    with pytest.raises(ConfigError, match=r"micro_batch_size x train.grad_accum x data-parallel size = "
                                          r"16 x 2 x 2 = 64 != train.global_batch_size=48"):
        load_config(overrides=["train.global_batch_size=48", "train.micro_batch_size=16", "train.grad_accum=2"],
                    world_size=2)


def test_grad_accum_derived_or_refused():
    cfg = load_config(overrides=["train.global_batch_size=64", "train.micro_batch_size=8", "train.grad_accum=0"],
                      world_size=4)
    assert cfg.train.grad_accum == 2
    with pytest.raises(ConfigError, match=r"global_batch_size=60 is not divisible by micro_batch_size x"):
        load_config(overrides=["train.global_batch_size=60", "train.micro_batch_size=8", "train.grad_accum=0"],
                    world_size=4)


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["parallel.tensor=3", "parallel.pipeline=3", "parallel.pipeline_split=1,1"],
                    world_size=9)
    text = str(e.value)
    assert "num_heads=4 is not divisible by parallel.tensor=3" in text
    assert "lists 2 stages but parallel.pipeline=3" in text


def test_missing_config_file():
    with pytest.raises(ConfigError, match=r"config file 'nope.yaml' does not exist"):
        load_config("nope.yaml", world_size=1)


def test_malformed_override():
    with pytest.raises(ConfigError, match=r"not of the form key.sub=value"):
        load_config(overrides=["train.steps"], world_size=1)


def test_every_leaf_has_help():
    from heptapod_ds.config import field_help
    rows = field_help()
    assert len(rows) == len(all_keys())
    assert all(text for _, text, _ in rows)
