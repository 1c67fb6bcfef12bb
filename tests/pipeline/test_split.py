"""The stage split: balanced by the FLOPs of model/flops.py, explicit counts, attachments, names per stage."""
import itertools
import os
import subprocess
import sys

import pytest

from heptapod_ds.config import load_config
from heptapod_ds.model.flops import chain_flops, forward_flops_per_image
from heptapod_ds.pipeline import bubble_fraction, split_model


def _preset(name, **extra):
    return load_config(overrides=[f"preset={name}", *[f"{k}={v}" for k, v in extra.items()]], world_size=1,
                       validate_config=False)


def test_h_over_four_stages_is_balanced():
    split = split_model(_preset("H"), stages=4)
    assert all(0.2 <= s <= 0.3 for s in split.shares), split.shares
    assert abs(sum(split.shares) - 1) < 1e-12
    # the head and output are most of the work: the first stage takes the whole backbone and more
    assert split.stages[0].layer_indices("backbone") == list(range(24))
    assert split.stages[-1].has("output")


@pytest.mark.parametrize("preset", ["B", "L", "XL", "H"])
@pytest.mark.parametrize("stages", [2, 4])
def test_auto_split_minimises_the_largest_stage(preset, stages):
    cfg = _preset(preset)
    auto = split_model(cfg, stages=stages)
    total = cfg.backbone.depth + cfg.head.depth
    best = float("inf")
    # every composition of the layers into `stages` parts (the last may be empty: output only)
    for cuts in itertools.combinations(range(1, total + 1), stages - 1):
        counts = [b - a for a, b in zip((0,) + cuts, cuts + (total,))]
        if any(c < 1 for c in counts[:-1]):
            continue
        best = min(best, max(split_model(cfg, stages=stages, split=",".join(map(str, counts))).shares))
    assert max(auto.shares) == pytest.approx(best, rel=1e-12)


def test_chain_is_the_flops_accounting():
    for preset in ("tiny", "B", "H"):
        for head in ("global", "local", "next"):
            cfg = _preset(preset, **{"head.type": head})
            assert sum(f for _, f in chain_flops(cfg)) == pytest.approx(sum(forward_flops_per_image(cfg).values()))


def test_attached_links_and_explicit_counts():
    cfg = _preset("tiny")  # backbone 4, head 2
    split = split_model(cfg, stages=3, split="2,3,1")
    assert split.counts == [2, 3, 1] and split.mode == "explicit"
    assert split.stages[0].links == ("embed", "backbone.0", "backbone.1")
    assert split.stages[1].links == ("backbone.2", "backbone.3", "head_input", "head.0")
    assert split.stages[2].links == ("head.1", "output")
    assert split.owns_last_backbone_layer(1) and split.owns_last_head_layer(2)
    only_output = split_model(cfg, stages=2, split="6,0")
    assert only_output.stages[1].links == ("output",)
    nxt = split_model(_preset("tiny", **{"head.type": "next"}), stages=2)
    assert all(not l.startswith("head") for s in nxt.stages for l in s.links)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_stage_parameters_partition_the_whole_model(single_rank):
    from heptapod_ds.model.heptapod import HeptapodModel
    from heptapod_ds.pipeline.stage import PipelineStage, merge_stage_state_dicts, stage_parameter_names

    for head in ("global", "next"):
        cfg = _preset("tiny", **{"head.type": head, "backbone.pos_embed": "learned"})
        full = HeptapodModel(cfg)
        full_names = [n for n, _ in full.named_parameters()]
        for counts in (("1,5", "3,3", "6,0") if head == "global" else ("1,3", "4,0")):
            split = split_model(cfg, stages=2, split=counts)
            stages, dicts = [], []
            for k in range(2):
                model = HeptapodModel(cfg)
                model.load_state_dict(full.state_dict())
                stage = PipelineStage(model, split, k)
                names = [n for n, _ in stage.named_parameters()]
                assert sorted(names) == sorted(stage_parameter_names(full_names, full, split, k))
                stages.append(stage)
                dicts.append({n: p for n, p in stage.named_parameters()})
            merged = merge_stage_state_dicts(dicts)
            assert sorted(merged) == sorted(full_names), counts
            with pytest.raises(ValueError, match="held by two pipeline stages"):
                merge_stage_state_dicts([dicts[0], dicts[0]])


def test_presets_cli_prints_the_split(repo_root):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "heptapod_ds.presets", "--pipeline", "4", "H"], cwd=repo_root,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pipeline split over 4 stages (auto): layers per stage 25,7,7,1" in r.stdout
    assert "1F1B bubble" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "heptapod_ds.presets", "--pipeline", "2", "--split", "1,1", "H"],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "sums to 2 layers; the model has 40" in bad.stderr
