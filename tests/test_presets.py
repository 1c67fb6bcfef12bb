"""Preset sizes and the `python -m heptapod_ds.presets` contract."""
import json
import os
import subprocess
import sys

import pytest

from heptapod_ds.presets import preset_table


def _cli(*args, repo_root):
    # A clean launcher environment: earlier in-process worlds leave MASTER_PORT & co. in os.environ.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "heptapod_ds.presets", *args], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def table():
    return preset_table()


def test_sizes_match_the_paper_scale(table):
    assert abs(table["H"]["total"] / 941e6 - 1) <= 0.03
    assert abs(table["B"]["total"] / 208e6 - 1) <= 0.10
    assert abs(table["L"]["total"] / 479e6 - 1) <= 0.10
    assert table["L"]["total"] < table["XL"]["total"] < table["H"]["total"]
    for row in table.values():
        assert row["total"] == row["backbone"] + row["head"] + row["diffusion"]
        assert row["train_flops_per_image"] > 0


def test_flops_grow_with_size_and_count_the_head(table):
    order = ["tiny", "B", "L", "XL", "H"]
    flops = [table[p]["train_flops_per_image"] for p in order]
    assert flops == sorted(flops)


def test_head_cost_and_density_are_counted():
    from heptapod_ds.config.loader import load_config
    from heptapod_ds.model.flops import forward_flops_per_image, train_flops_per_image

    base = load_config(overrides=["preset=B"], world_size=1, validate_config=False)
    denser = load_config(overrides=["preset=B", "head.supervised=128"], world_size=1, validate_config=False)
    nxt = load_config(overrides=["preset=B", "head.type=next"], world_size=1, validate_config=False)
    assert train_flops_per_image(denser) > train_flops_per_image(base)
    assert forward_flops_per_image(nxt)["head"] == 0
    assert train_flops_per_image(nxt) < train_flops_per_image(base)


def test_param_counts_match_a_real_build(single_rank):
    from heptapod_ds.config.loader import load_config
    from heptapod_ds.model import build_model
    from heptapod_ds.model.flops import param_counts

    cfg = load_config(overrides=["tokenizer.name=patch", "head.type=local"], world_size=1)
    model = build_model(cfg)
    counts = param_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["diffusion"] == sum(p.numel() for p in model.output.parameters())


def test_cli_json_contract(repo_root):
    out = _cli("--json", "tiny", "H", repo_root=repo_root)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {"tiny", "H"}
    assert set(data["H"]) == {"backbone", "head", "diffusion", "total", "train_flops_per_image"}
    assert all(isinstance(v, int) for v in data["H"].values())


def test_cli_table_and_bad_preset(repo_root):
    out = _cli(repo_root=repo_root)
    assert out.returncode == 0 and "XL" in out.stdout and "GFLOPs" in out.stdout
    bad = _cli("Z", repo_root=repo_root)
    assert bad.returncode != 0 and "unknown preset" in bad.stderr
