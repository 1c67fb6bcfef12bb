"""The tiny model memorizes 8 digit images: the training loss at least halves in a bounded number of steps."""
import pytest
import torch

from heptapod_ds.model import build_model
from model_helpers import digits
from heptapod_ds.config.loader import load_config


def _train(kind, head, steps):
    tok = ["tokenizer.name=pixel"] if kind == "discrete" else ["tokenizer.name=patch", "tokenizer.channels=1"]
    cfg = load_config(overrides=tok + [f"head.type={head}", "backbone.depth=2", "backbone.width=64",
                                       "head.depth=1", "head.width=64", "diffusion.width=64"], world_size=1)
    torch.manual_seed(0)
    model = build_model(cfg)
    pixels, patches, labels = digits(8)
    tokens = pixels if kind == "discrete" else patches
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    seeds = torch.arange(8)
    losses = []
    for step in range(steps):
        # fresh (but reproducible) timesteps, positions and noise at every step
        loss, _ = model(tokens, labels, sample_seeds=seeds + 8 * step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind,head,steps", [("discrete", "global", 160), ("continuous", "global", 150),
                                             ("discrete", "next", 80)])
def test_tiny_overfits_eight_digits(single_rank, kind, head, steps):
    losses = _train(kind, head, steps)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.5 * first, f"loss {first:.3f} -> {last:.3f}"
