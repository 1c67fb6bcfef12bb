"""Building the model inside DeepSpeed's ZeRO-3 ``zero.Init`` gives the same initial weights as a plain
build (post-construction init must not be lost on already-partitioned parameters)."""
import pytest
import torch

from model_helpers import tiny_cfg


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_zero3_init_matches_plain_build(single_rank, kind):
    import deepspeed

    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.engine.builder import init_deepspeed_distributed
    from heptapod_ds.model import build_model

    cfg = tiny_cfg(kind, "global")
    parallel_state.seed_everything(7)
    plain = {k: v.detach().clone() for k, v in build_model(cfg).named_parameters()}
    init_deepspeed_distributed()
    parallel_state.seed_everything(7)
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(data_parallel_group=parallel_state.dp_group(), mpu=parallel_state.mpu(),
                             config_dict_or_path=ds_cfg):
        sharded = build_model(cfg)
    params = dict(sharded.named_parameters())
    assert all(hasattr(p, "ds_id") for p in params.values()), "zero.Init did not partition the model"
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            assert torch.equal(p.detach(), plain[name]), f"{name} differs under zero.Init"
