"""The cost model's FLOPs against torch's FlopCounterMode on real forward passes (tiny, small and B/H widths at
reduced depth), its analytic parameter counts against the built model, and its independence of model code."""
import subprocess
import sys

import pytest
import torch

from heptapod_ds.config.loader import load_config

SHAPES = {
    "tiny": ["preset=tiny"],
    "small": ["preset=small"],
    # B and H widths, grid, T and K at 2 + 1 layers (the per-layer counts do not depend on depth)
    "B": ["preset=B", "backbone.depth=2", "head.depth=1", "diffusion.depth=2"],
    "H": ["preset=H", "backbone.depth=1", "head.depth=1", "diffusion.depth=1"],
}
HEADS = ("global", "local", "next")


def _cfg(name, head, extra=()):
    return load_config(overrides=SHAPES[name] + [f"head.type={head}", "backbone.attention=megatron",
                                                  "train.micro_batch_size=1", "train.global_batch_size=1"]
                       + list(extra), world_size=1)


def _batch(cfg, batch):
    n = cfg.tokenizer.num_tokens
    g = torch.Generator().manual_seed(0)
    if cfg.tokenizer.is_discrete:
        tokens = torch.randint(0, cfg.tokenizer.vocab_size, (batch, n), generator=g)
    else:
        tokens = torch.randn(batch, n, cfg.tokenizer.channels, generator=g)
    return tokens, torch.arange(batch) % cfg.backbone.num_classes, torch.arange(batch) + 11


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the GPU attention kernels, not the CPU flash kernel that SDPA takes here (the local
# head's attention is SDPA whatever backbone.attention says): count it as the others are
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}

CASES = [("tiny", "local", ()), ("tiny", "next", ()), ("small", "global", ()),
         ("small", "global", ("tokenizer.name=patch", "tokenizer.channels=1")),
         ("B", "global", ()), ("B", "next", ()), ("H", "local", ()),
         ("B", "global", ("tokenizer.name=vq16", "head.supervised=16"))]


@pytest.mark.parametrize("name,head,extra", CASES)
def test_forward_flops_match_flop_counter(single_rank, name, head, extra):
    from torch.utils.flop_counter import FlopCounterMode

    from heptapod_ds.cost.flops import chain_flops
    from heptapod_ds.model import build_model

    cfg = _cfg(name, head, extra)
    model = build_model(cfg)
    batch = 1
    tokens, labels, seeds = _batch(cfg, batch)
    draws = model.draw_randomness(tokens, labels, seeds)
    targets = float(draws.plan.counts.sum()) / batch
    counter = FlopCounterMode(display=False, custom_mapping=CPU_SDPA)
    with counter, torch.no_grad():
        model(tokens, labels, draws=draws)
    measured = counter.get_total_flops() / batch
    sequences = None  # the global head: T of N + 1 slots; the local head: this draw's cut lengths
    if draws.packed is not None:
        sequences = [(length, size / batch) for length, size in zip(draws.packed.lengths, draws.packed.sizes)]
    predicted = sum(f for _, f in chain_flops(cfg, targets=targets, head_sequences=sequences))
    # what the accounting leaves out on purpose: norms, activations, softmax (not matmuls, so the counter
    # does not count them either); the counter sees the backbone embed N-1 tokens, the model counts N
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)


@pytest.mark.parametrize("overrides", [
    ["preset=tiny"], ["preset=small", "head.type=next"], ["preset=B"], ["preset=H", "head.type=local"],
    ["preset=B", "tokenizer.name=vq16", "backbone.pos_embed=learned", "head.pos_embed=rope2d"],
])
def test_analytic_params_equal_the_built_model(overrides):
    from heptapod_ds.cost.flops import param_totals
    from heptapod_ds.model.flops import param_counts

    cfg = load_config(overrides=overrides, world_size=1, validate_config=False)
    assert param_totals(cfg) == param_counts(cfg)


def test_expected_targets_agree_with_the_model():
    from heptapod_ds.cost.flops import expected_targets_per_image as cost_targets
    from heptapod_ds.model.supervision import expected_targets_per_image as model_targets

    for args in [(64, 3, 5, 6), (256, 4, 64, 32), (256, 4, 64, None), (16, 2, 0, None), (16, 2, 0, 4)]:
        assert cost_targets(*args) == model_targets(*args)


def test_cost_config_and_engine_import_no_model_code():
    code = ("import sys; import heptapod_ds.cost.flops, heptapod_ds.cost.memory, heptapod_ds.cost.recompute; "
            "import heptapod_ds.config.loader, heptapod_ds.pipeline.split; "
            "from heptapod_ds.config import load_config; load_config(overrides=['preset=H'], world_size=1); "
            "bad = [m for m in sys.modules if m.startswith('heptapod_ds.model')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
