"""The cost model's activation bytes against exact measurement (saved_tensors_hooks through the real model's
forward, unique storages, parameters and buffers left out, checkpoint regions' inputs counted): within 10%
per part, for tiny, small, B- and H-shaped models at reduced depth (same widths, grid, T and K), micro batch
1-2, every recompute setting, fp32 and bf16, global / local / next heads, discrete and continuous tokens."""
import pytest
import torch

from heptapod_ds.config.loader import load_config

SHAPES = {
    "tiny": ["preset=tiny"],
    "small": ["preset=small", "tokenizer.name=patch", "tokenizer.channels=4"],
    "B": ["preset=B", "backbone.depth=2", "head.depth=2", "diffusion.depth=2"],
    "H": ["preset=H", "backbone.depth=2", "head.depth=2", "diffusion.depth=1"],
}
RECOMPUTE = {
    "none": [],
    "selective": ["recompute.granularity=selective"],
    "full": ["recompute.granularity=full"],
    "full_block": ["recompute.granularity=full", "recompute.method=block"],
    "full_uniform_2": ["recompute.granularity=full", "recompute.num_layers=2"],
}
CASES = [
    # shape, batch, head, recompute, extra overrides
    ("tiny", 2, "local", "none", []),
    ("tiny", 2, "global", "full", ["backbone.dropout=0.1"]),
    ("tiny", 2, "next", "selective", ["backbone.dropout=0.1", "parallel.precision=bf16"]),
    ("small", 2, "global", "none", []),
    ("small", 2, "local", "selective", ["backbone.dropout=0.1"]),
    ("small", 2, "next", "full_uniform_2", []),
    ("small", 2, "local", "full_block", ["parallel.precision=bf16", "backbone.dropout=0.1"]),
    ("small", 2, "global", "none", ["backbone.attention=megatron", "head.pos_embed=rope2d"]),
    ("B", 1, "global", "none", []),
    ("B", 1, "local", "full", ["parallel.precision=bf16"]),
    ("B", 1, "global", "selective", ["tokenizer.name=vq16"]),
    ("H", 1, "local", "none", ["parallel.precision=bf16"]),
    ("H", 1, "global", "full_block", []),
    ("H", 1, "next", "none", []),
]


def measure(cfg, batch):
    from heptapod_ds.cost.measure import count_saved
    from heptapod_ds.model import build_model

    model = build_model(cfg)
    from heptapod_ds.model.recompute import apply_recompute
    apply_recompute(model, cfg)
    if cfg.parallel.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    n = cfg.tokenizer.num_tokens
    g = torch.Generator().manual_seed(0)
    if cfg.tokenizer.is_discrete:
        tokens = torch.randint(0, cfg.tokenizer.vocab_size, (batch, n), generator=g)
    else:
        tokens = torch.randn(batch, n, cfg.tokenizer.channels, generator=g)
    labels = torch.arange(batch) % cfg.backbone.num_classes
    draws = model.draw_randomness(tokens, labels, torch.arange(batch) + 5)
    with count_saved(model) as out:
        loss, _ = model(tokens, labels, draws=draws)
    del loss
    sequences = None  # the local head: this draw's cut lengths (the global head's are fixed)
    if draws.packed is not None:
        sequences = [(length, size / batch) for length, size in zip(draws.packed.lengths, draws.packed.sizes)]
    return out, float(draws.plan.counts.sum()) / batch, sequences


def predict(cfg, batch, targets, sequences, monkeypatch):
    from heptapod_ds.cost import memory

    monkeypatch.setattr(memory, "targets_per_image", lambda _cfg: targets)  # this batch's drawn plan
    return memory.activation_bytes(cfg, batch, device="cpu", head_sequences=sequences)


ROWS = []


@pytest.mark.parametrize("shape,batch,head,recompute,extra", CASES)
def test_activation_bytes_match_measurement(single_rank, monkeypatch, shape, batch, head, recompute, extra):
    cfg = load_config(overrides=SHAPES[shape] + [f"head.type={head}", f"train.micro_batch_size={batch}",
                                                  f"train.global_batch_size={batch}"] + RECOMPUTE[recompute]
                      + extra, world_size=1)
    measured, targets, sequences = measure(cfg, batch)
    measured["output"] += measured.pop("other")  # the loss glue is counted with the output
    predicted = predict(cfg, batch, targets, sequences, monkeypatch)
    ROWS.append((shape, head, recompute, extra, measured["total"], predicted["total"]))
    for part in ("backbone", "head", "output", "total"):
        if measured[part] == 0:
            assert predicted[part] == 0, part
            continue
        ratio = predicted[part] / measured[part]
        assert 0.9 <= ratio <= 1.1, f"{part}: predicted {predicted[part]:.0f} vs measured {measured[part]} ({ratio:.3f})"
