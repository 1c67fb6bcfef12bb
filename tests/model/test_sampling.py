"""Generation: the KV cache equals recomputing the prefix, image i depends only on its own seed."""
import pytest
import torch

from heptapod_ds.model.categorical import sample_logits
from heptapod_ds.model.diffusion import cosine_alphas_cumprod
from heptapod_ds.sampling import image_seeds
from model_helpers import HEAD_TYPES


def _seeds(n, seed=0):
    return image_seeds(seed, range(n))


@pytest.mark.parametrize("head,pos_embed", [(h, "learned") for h in HEAD_TYPES] + [("local", "rope2d")])
def test_kv_cache_matches_recompute_discrete(tiny_model, head, pos_embed):
    cfg, model = tiny_model("discrete", head, **{"head.pos_embed": pos_embed})
    labels = torch.tensor([0, 4, 9])
    cached = model.generate(labels, _seeds(3, 5), temperature=1.0, top_k=8)
    full = model.generate(labels, _seeds(3, 5), temperature=1.0, top_k=8, use_kv_cache=False)
    assert cached.dtype == torch.long and cached.shape == (3, cfg.tokenizer.num_tokens)
    assert torch.equal(cached, full)
    assert torch.equal(model.generate(labels, _seeds(3, 5), temperature=1.0, top_k=8), cached)
    assert not torch.equal(model.generate(labels, _seeds(3, 6), temperature=1.0, top_k=8), cached)


class _OracleDenoiser(torch.nn.Module):
    """The denoiser of a model that has learned its data exactly: x0 = tanh(W z) given the condition z.

    An untrained denoiser amplifies x0 by 1/sqrt(alpha_bar) ~ 1e4 at the noisiest level, so its samples
    are huge and any bound on them is meaningless. With this one a sample ends at trained scale (|x| <= 1
    plus the last step's noise), and it depends on the condition z, so an error in the cached conditions
    shows up in the samples (x0 = tanh(W LN(z) / sqrt(d)), so the conditions' small differences count)."""

    def __init__(self, alphas_cumprod, cond_dim, channels):
        super().__init__()
        self.abar = alphas_cumprod
        self.proj = torch.nn.Linear(cond_dim, channels)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(channels, cond_dim, generator=torch.Generator().manual_seed(7)))
            self.proj.bias.zero_()

    def forward(self, x, t, z):
        a = self.abar[t].to(x.dtype).unsqueeze(-1)
        z = torch.nn.functional.layer_norm(z, z.shape[-1:])  # an untrained head's conditions differ but little
        x0 = torch.tanh(self.proj(z) / z.shape[-1] ** 0.5)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def _use_oracle_denoiser(model):
    out = model.output
    out.net = _OracleDenoiser(out.alphas_cumprod, out.net.cond_embed.in_features, out.channels)


@pytest.mark.parametrize("head", HEAD_TYPES)
def test_kv_cache_matches_recompute_continuous(tiny_model, head):
    cfg, model = tiny_model("continuous", head)
    _use_oracle_denoiser(model)
    labels = torch.tensor([1, 2])
    cached = model.generate(labels, _seeds(2, 3), num_steps=8)
    full = model.generate(labels, _seeds(2, 3), num_steps=8, use_kv_cache=False)
    assert cached.shape == (2, cfg.tokenizer.num_tokens, 1) and cached.is_floating_point()
    assert float(full.abs().max()) < 3.0, "the oracle denoiser keeps samples at trained scale"
    assert float(full.std()) > 0.03, "and they are not constant"
    # the same per-image generator draws, the conditions equal to fp32 round-off: absolute 1e-5
    assert (cached - full).abs().max() <= 1e-5
    assert torch.equal(model.generate(labels, _seeds(2, 3), num_steps=8), cached)
    # the bound sees the conditions: other labels (same noise; the untrained model barely uses the label)
    # move the samples by more than 10x the bound
    assert (model.generate(torch.tensor([7, 8]), _seeds(2, 3), num_steps=8) - cached).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_cached_backbone_equals_full_forward(tiny_model, kind):
    from heptapod_ds.model.heptapod import _make_cache
    from model_helpers import random_tokens

    cfg, model = tiny_model(kind, "global")
    n = cfg.tokenizer.num_tokens
    tokens = random_tokens(kind, 2, cfg, torch.Generator().manual_seed(0))[:, :n - 1]
    labels = torch.tensor([3, 10])
    model.eval()
    with torch.no_grad():
        full = model.backbone(labels, tokens)
        cache = _make_cache(2, n)
        steps = [model.backbone(labels, tokens[:, :t], start=t, inference_context=cache) for t in range(n)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="KV cache holds"):
        model.backbone(labels, tokens[:, :3], start=2, inference_context=cache)


def test_generate_keeps_training_mode(tiny_model):
    _, model = tiny_model("discrete", "next")
    model.train()
    model.generate(torch.tensor([0]), _seeds(1))
    assert model.training


def test_argmax_and_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_logits(logits, 0.0, 0, None).item() == 1
    g = [torch.Generator().manual_seed(0)]
    draws = {sample_logits(logits, 5.0, 2, g).item() for _ in range(200)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, -1.0, 0, None)
    with pytest.raises(ValueError, match="one generator per row"):
        sample_logits(logits.repeat(2, 1), 1.0, 0, g)


def test_sample_logits_rows_use_their_own_generator():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    rows = [sample_logits(logits[i:i + 1], 1.0, 0, [torch.Generator().manual_seed(10 + i)]) for i in range(4)]
    together = sample_logits(logits, 1.0, 0, [torch.Generator().manual_seed(10 + i) for i in range(4)])
    assert torch.equal(torch.cat(rows), together)


@pytest.mark.parametrize("kind,head", [("discrete", "global"), ("discrete", "next"), ("continuous", "global")])
def test_image_depends_only_on_its_seed(tiny_model, kind, head):
    """Image i is the same whether drawn in a batch of 8, in batches of 3, alone, or without the KV cache."""
    _, model = tiny_model(kind, head)
    if kind == "continuous":
        _use_oracle_denoiser(model)
    labels = torch.arange(8) % 10
    seeds = _seeds(8, 11)
    kw = {"temperature": 1.0, "top_k": 0} if kind == "discrete" else {"num_steps": 4}
    big = model.generate(labels, seeds, **kw)
    small = torch.cat([model.generate(labels[i:i + 3], seeds[i:i + 3], **kw) for i in range(0, 8, 3)])
    shuffled_order = torch.tensor([5, 2, 7])
    shuffled = model.generate(labels[shuffled_order], seeds[shuffled_order], use_kv_cache=False, **kw)
    if kind == "discrete":
        assert torch.equal(big, small)
        assert torch.equal(shuffled, big[shuffled_order])
    else:  # float matmuls of different batch sizes may round differently; the noise is per image
        assert float(big.abs().max()) < 3.0
        assert (big - small).abs().max() <= 1e-5
        assert (shuffled - big[shuffled_order]).abs().max() <= 1e-5
    other = model.generate(labels, _seeds(8, 12), **kw)
    assert not torch.equal(other, big)


def test_image_seeds_rule():
    a = image_seeds(0, range(6))
    assert a.dtype == torch.long and a.shape == (6,) and len(set(a.tolist())) == 6 and (a >= 0).all()
    assert torch.equal(image_seeds(0, [3, 4]), a[3:5])  # a function of (global seed, index) only
    assert torch.equal(image_seeds(0, torch.tensor([5])), a[5:])
    assert not set(image_seeds(1, range(6)).tolist()) & set(a.tolist())
    with pytest.raises(ValueError, match=">= 0"):
        image_seeds(0, [-1])


def test_generate_rejects_bad_seeds(tiny_model):
    _, model = tiny_model("discrete", "next")
    with pytest.raises(ValueError, match="one seed per image"):
        model.generate(torch.tensor([0, 1]), _seeds(3))
    with pytest.raises(ValueError, match="long tensor"):
        model.generate(torch.tensor([0]), torch.tensor([1.0]))


def test_cosine_schedule_is_monotone():
    abar = cosine_alphas_cumprod(1000)
    assert abar.shape == (1000,) and (abar[1:] < abar[:-1]).all()
    assert abar[0] > 0.999 and abar[-1] < 1e-3


def test_ddpm_sampler_rejects_bad_steps(tiny_model):
    _, model = tiny_model("continuous", "next")
    with pytest.raises(ValueError, match="num_steps"):
        model.generate(torch.tensor([0]), _seeds(1), num_steps=0)
