"""Heads: no leakage from tokens after t (learned or rotary head positions), supervision draws, per-sample
seeding of the loss."""
import pytest
import torch

from heptapod_ds.model.heads import local_attention_mask
from heptapod_ds.model.supervision import draw_plan, expected_targets_per_image
from model_helpers import HEAD_TYPES, TOKEN_KINDS, random_tokens


def _conditions(model, tokens, labels, t):
    """z_{t,j} for every j > t (the 'next' head: z_t only), shape [B, *, width]."""
    n = model.num_tokens
    o = model.backbone(labels, tokens[:, :n - 1])
    if model.head is None:
        return o[:, t:t + 1]
    steps = torch.full((tokens.shape[0], 1), t, dtype=torch.long)
    return model.head.by_slot(model.head(o, steps), tokens.shape[0])[:, 0, t + 1:]


@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("head,pos_embed", [(h, "learned") for h in HEAD_TYPES]
                         + [("global", "rope2d"), ("local", "rope2d")])
def test_prediction_at_t_ignores_tokens_after_t(tiny_model, kind, head, pos_embed):
    cfg, model = tiny_model(kind, head, **{"head.pos_embed": pos_embed})
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([3, 7])
    for t in (0, 9, 40, cfg.tokenizer.num_tokens - 1):
        tokens = random_tokens(kind, 2, cfg, g)
        changed = tokens.clone()
        changed[:, t:] = random_tokens(kind, 2, cfg, g)[:, t:]
        z, z2 = _conditions(model, tokens, labels, t), _conditions(model, changed, labels, t)
        torch.testing.assert_close(z2, z, rtol=0, atol=1e-6)
        _check_gradients_stop_at_t(model, tokens, labels, t, z.shape, g)


def _check_gradients_stop_at_t(model, tokens, labels, t, z_shape, g):
    """d z_{t,*} / d e(x_s) must be exactly zero for every token embedding after t, nonzero before."""
    captured = {}

    def keep(module, inputs, out):
        out.retain_grad()
        captured["emb"] = out

    hook = model.backbone.token_embed.register_forward_hook(keep)
    try:
        model.zero_grad()
        (_conditions(model, tokens, labels, t) * torch.randn(z_shape, generator=g)).sum().backward()
    finally:
        hook.remove()
    grad = captured["emb"].grad                   # [B, N-1, Wb]: embedding of tokens[:, s], s = 0..N-2
    assert (grad[:, t:] == 0).all(), "gradient reached a token after t"
    if t > 0:
        assert grad[:, :t].abs().sum() > 0, "the prefix must receive gradient"


def test_local_mask_window_and_prefix():
    t, w, s = 3, 2, 10
    blocked = local_attention_mask(torch.tensor([t]), s, w)[0, 0]
    allowed = ~blocked
    assert allowed[t + 1, : t + w + 1].all() and not allowed[t + 1, t + w + 1:].any()  # window query
    assert allowed[2, : t + 1].all() and not allowed[2, t + 1:].any()                  # prefix query
    assert allowed[8].nonzero().flatten().tolist() == [8]                              # beyond the window


@pytest.mark.parametrize("window", [None, 6])
def test_plan_draws_next_position_and_k_allowed(window):
    n, t_count, k = 64, 4, 5
    gens = [torch.Generator().manual_seed(i) for i in range(16)]
    plan = draw_plan(gens, n, t_count, k, window)
    assert plan.timesteps.shape == (16, t_count)
    for b in range(16):
        assert plan.timesteps[b].unique().numel() == t_count
    rows_t = plan.timesteps.reshape(-1)[plan.rows]
    assert (plan.slots > rows_t).all() and (plan.slots <= n).all()
    if window is not None:
        assert (plan.slots <= rows_t + window).all()
    for r in plan.rows.unique():
        slots = plan.slots[plan.rows == r]
        t = int(plan.timesteps.reshape(-1)[r])
        assert int(slots[0]) == t + 1 and slots.unique().numel() == len(slots)
        assert len(slots) == min(k, n - t if window is None else min(window, n - t))
    assert plan.counts.sum() == len(plan.slots)
    assert abs(plan.counts.float().mean() - expected_targets_per_image(n, t_count, k, window)) < 3


def test_supervised_zero_means_all_allowed():
    plan = draw_plan([torch.Generator().manual_seed(0)], 64, 2, 0, None)
    assert plan.counts.item() == sum(64 - int(t) for t in plan.timesteps[0])


@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("head", ["global", "next"])
def test_sample_seeds_make_loss_independent_of_batch(tiny_model, kind, head):
    cfg, model = tiny_model(kind, head)
    tokens = random_tokens(kind, 4, cfg, torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 2, 3])
    seeds = torch.tensor([11, 12, 13, 14])
    whole, stats = model(tokens, labels, sample_seeds=seeds)
    halves = [model(tokens[i:i + 2], labels[i:i + 2], sample_seeds=seeds[i:i + 2])[0] for i in (0, 2)]
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=0)
    assert stats["loss"] == pytest.approx(float(whole))
    again, _ = model(tokens, labels, sample_seeds=seeds)
    assert float(again) == float(whole)
    if not (kind == "discrete" and head == "next"):  # that loss has no random draw at all
        other, _ = model(tokens, labels, sample_seeds=seeds + 100)
        assert float(other) != float(whole)


def test_no_weight_decay_names_exist(tiny_model):
    cfg, model = tiny_model("discrete", "global", **{"backbone.pos_embed": "learned"})
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert names <= set(params)
    assert {"backbone.class_embed.weight", "backbone.token_embed.weight", "head.mask_token",
            "head.pos_embed.row_embed", "backbone.pos_embed.col_embed"} <= names


def test_rope_head_has_rotary_angles_and_no_position_table(tiny_model):
    from heptapod_ds.model.positions import rope2d_freqs

    cfg, model = tiny_model("discrete", "local", **{"head.pos_embed": "rope2d"})
    assert not any(".pos_embed." in n for n, _ in model.head.named_parameters())
    head_dim = cfg.head.width // cfg.head.num_heads
    expected = rope2d_freqs(cfg.tokenizer.grid_size, head_dim, cfg.backbone.rope_theta)
    assert torch.equal(model.head.rotary(), expected)
    # the angles reach the head's attention: rotating by zero (no positions) changes the conditions
    tokens = random_tokens("discrete", 2, cfg, torch.Generator().manual_seed(4))
    o = model.backbone(torch.tensor([1, 2]), tokens[:, :-1])
    steps = torch.tensor([[5], [20]])
    with_rope = model.head(o, steps)
    model.head.rope_freqs.zero_()
    assert not torch.allclose(model.head(o, steps), with_rope, atol=1e-4)
