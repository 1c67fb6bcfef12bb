"""Activation recompute is the same math: losses and gradients bit-identical to recompute=none on CPU fp32,
with dropout on (attention and hidden dropout, label dropout) and the diffusion noise, for every head and
token kind and every recompute setting; misuse is refused by config validation with the fix named."""
import pytest
import torch

from model_helpers import HEAD_TYPES, TOKEN_KINDS, random_tokens, randomize_zero_params, tiny_cfg

SETTINGS = {
    "selective": ["recompute.granularity=selective"],
    "full_uniform_1": ["recompute.granularity=full"],
    "full_uniform_2": ["recompute.granularity=full", "recompute.num_layers=2"],
    "full_block_1": ["recompute.granularity=full", "recompute.method=block", "recompute.num_layers=1"],
    "full_head_only": ["recompute.granularity=full", "recompute.parts=head"],
    "full_output_only": ["recompute.granularity=full", "recompute.parts=output"],
}
DROPOUT = {"backbone.dropout": 0.1, "backbone.class_dropout": 0.2}


def _override_dict(items):
    return dict(item.split("=", 1) for item in items)


def _loss_and_grads(kind, head, overrides):
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.model import build_model
    from heptapod_ds.model.recompute import apply_recompute

    cfg = tiny_cfg(kind, head, **DROPOUT, **_override_dict(overrides))
    parallel_state.seed_everything(0)
    model = build_model(cfg)
    randomize_zero_params(model)
    apply_recompute(model, cfg)  # idempotent: the model may have applied it already
    model.train()
    tokens = random_tokens(kind, 4, cfg, torch.Generator().manual_seed(7))
    labels, seeds = torch.tensor([0, 3, 9, 10]), torch.tensor([21, 22, 23, 24])
    parallel_state.seed_everything(5)  # same dropout streams (default generator and megatron's tracker)
    loss, _ = model(tokens, labels, sample_seeds=seeds)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,head", [(k, h) for k in TOKEN_KINDS for h in HEAD_TYPES])
def test_every_setting_is_bit_identical_to_none(single_rank, kind, head):
    ref_loss, ref_grads = _loss_and_grads(kind, head, [])
    for name, overrides in SETTINGS.items():
        if head == "next" and name == "full_head_only":
            continue
        loss, grads = _loss_and_grads(kind, head, overrides)
        assert torch.equal(loss, ref_loss), f"{name}: loss {float(loss)} != {float(ref_loss)}"
        assert grads.keys() == ref_grads.keys(), name
        for n in grads:
            assert torch.equal(grads[n], ref_grads[n]), f"{name}: gradient of {n} differs"


def test_recompute_saves_activations(single_rank):
    """Sanity: each setting saves fewer bytes for backward than none (counted exactly)."""
    from heptapod_ds.cost.measure import saved_activation_bytes

    def measured(overrides):
        from heptapod_ds.model import build_model
        from heptapod_ds.model.recompute import apply_recompute

        cfg = tiny_cfg("continuous", "global", **_override_dict(overrides))
        model = build_model(cfg)
        apply_recompute(model, cfg)
        tokens = random_tokens("continuous", 2, cfg, torch.Generator().manual_seed(7))
        return saved_activation_bytes(model, tokens, torch.tensor([0, 3]), torch.tensor([1, 2]))["total"]

    none = measured([])
    for name in ("selective", "full_uniform_1", "full_uniform_2"):
        assert measured(SETTINGS[name]) < none, name


@pytest.mark.parametrize("overrides,needle", [
    (["recompute.granularity=selective", "recompute.method=block"], "drop recompute.method"),
    (["recompute.granularity=selective", "recompute.num_layers=2"], "drop recompute.num_layers"),
    (["recompute.granularity=full", "recompute.num_layers=3"], "recompute.num_layers<=2"),
    (["recompute.granularity=full", "recompute.parts=backbone,tail"], "unknown part(s) tail"),
    (["recompute.granularity=partial"], "recompute.granularity='partial' is not one of"),
    (["recompute.granularity=full", "recompute.num_layers=2", "parallel.pipeline=2", "parallel.world_size=2"],
     "recompute.method=block with pipelines"),
])
def test_impossible_combinations_are_refused(overrides, needle):
    from heptapod_ds.config import ConfigError

    with pytest.raises(ConfigError) as info:
        tiny_cfg("discrete", "global", world_size=2 if "parallel.pipeline=2" in overrides else 1,
                 **_override_dict(overrides))
    assert needle in str(info.value)


# --------------------------------------------------------------------------- with the engine, on 2 ranks

LAYOUTS = [  # (name, tp, pp, head, extra overrides)
    ("tp2", 2, 1, "global", ["parallel.zero_stage=1"]),
    ("pp2", 1, 2, "local", ["parallel.zero_stage=1", "train.global_batch_size=4", "train.micro_batch_size=1"]),
    ("zero3", 1, 1, "global", ["parallel.zero_stage=3"]),
    ("bf16_zero2", 1, 1, "local", ["parallel.zero_stage=2", "parallel.precision=bf16"]),
]
ENGINE_SETTINGS = ("none", "selective", "full_uniform_1")


def _engine_body(rank, world_size):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pipeline"))
    from pipeline_helpers import layout, small_overrides, strip, train

    out = {}
    for name, tp, pp, head, extra in LAYOUTS:
        for setting in ENGINE_SETTINGS:
            if pp > 1 and setting == "full_uniform_1":
                overrides_rc = ["recompute.granularity=full", "recompute.method=block", "recompute.num_layers=2"]
            else:
                overrides_rc = SETTINGS.get(setting, [])
            layout(tp, pp)
            overrides = (small_overrides("continuous", head) + ["backbone.dropout=0.1", f"parallel.tensor={tp}",
                                                                 f"parallel.pipeline={pp}", "train.global_batch_size=4",
                                                                 "train.micro_batch_size=2", "train.grad_accum=0"]
                         + extra + overrides_rc)
            result = strip(train(overrides, steps=2))
            out[(name, setting)] = {"losses": result["losses"], "params": result["params"]}
    return out


@pytest.mark.slow
def test_recompute_is_bit_identical_under_tp_pp_zero3_and_bf16():
    """TP=2 (dropout inside TP regions: megatron's tracker replayed), PP=2 (1F1B), ZeRO-3 (parameters gathered
    again by the recompute's pre-forward hooks) and bf16 ZeRO-2: losses and updated parameters after two
    optimizer steps equal recompute=none bit for bit."""
    from dist_harness import run_ranks

    results = run_ranks(_engine_body, 2, timeout=600)
    for rank_out in results:
        for name, *_ in LAYOUTS:
            ref = rank_out[(name, "none")]
            for setting in ENGINE_SETTINGS[1:]:
                got = rank_out[(name, setting)]
                assert got["losses"] == ref["losses"], (name, setting, got["losses"], ref["losses"])
                assert got["params"].keys() == ref["params"].keys()
                for k in ref["params"]:
                    assert torch.equal(got["params"][k], ref["params"][k]), (name, setting, k)
