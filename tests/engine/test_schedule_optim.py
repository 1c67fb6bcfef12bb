"""LR schedule shape, the scheduler following lr_at, and the weight-decay split."""
import math

import pytest
import torch

from heptapod_ds.config import load_config
from heptapod_ds.engine.optim import param_groups, split_decay
from heptapod_ds.engine.schedule import build_scheduler, lr_at


def _cfg(*overrides):
    return load_config(overrides=["optimizer.lr=1.0", "schedule.warmup_steps=4", "train.steps=14",
                                  "schedule.min_lr_ratio=0.1", *overrides], world_size=1)


def test_warmup_then_cosine_to_floor():
    cfg = _cfg()
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_constant_after_warmup_and_bad_step():
    cfg = _cfg("schedule.decay=constant")
    assert lr_at(3, cfg) == 1.0 and lr_at(1000, cfg) == 1.0
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, cfg)


def test_scheduler_follows_lr_at():
    cfg = _cfg("optimizer.lr=0.5")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=123.0)
    sched = build_scheduler(opt, cfg)
    for step in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg))
        opt.step()
        sched.step()


def test_no_decay_for_norms_biases_embeddings_and_listed_names(single_rank):
    from engine_standin import StandIn

    model = StandIn()
    decay, no_decay = split_decay(model)
    assert sorted(decay) == ["fc1.weight", "fc2.weight", "out.weight"]
    assert {"embed.weight", "gain", "norm1.weight", "norm1.bias", "fc1.bias", "out.bias"} <= set(no_decay)
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_unknown_no_weight_decay_name_is_an_error(single_rank):
    from engine_standin import StandIn

    model = StandIn()
    model.no_weight_decay = lambda: ["gian"]
    with pytest.raises(ValueError, match="do not exist: \\['gian'\\]"):
        split_decay(model)
