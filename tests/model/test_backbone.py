"""The causal backbone: causality, 2D rotary positions, input checks."""
import pytest
import torch

from heptapod_ds.model.positions import rope2d_freqs, slot_rows_cols
from model_helpers import random_tokens


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
@pytest.mark.parametrize("pos_embed", ["rope2d", "learned"])
def test_outputs_up_to_t_ignore_later_tokens(tiny_model, kind, pos_embed):
    cfg, model = tiny_model(kind, "global", **{"backbone.pos_embed": pos_embed})
    n = cfg.tokenizer.num_tokens
    g = torch.Generator().manual_seed(1)
    tokens = random_tokens(kind, 3, cfg, g)
    labels = torch.tensor([0, 5, cfg.backbone.num_classes])  # includes "no class"
    out = model.backbone(labels, tokens[:, :n - 1])
    assert out.shape == (3, n, cfg.backbone.width)
    for t in (0, 7, 30, n - 2):
        changed = tokens.clone()
        changed[:, t:] = random_tokens(kind, 3, cfg, g)[:, t:]  # x_{t+1}.. (0-based index t..)
        out2 = model.backbone(labels, changed[:, :n - 1])
        torch.testing.assert_close(out2[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-6)
        assert (out2[:, t + 1:] - out[:, t + 1:]).abs().max() > 1e-4, "later outputs must see the change"


def test_class_changes_every_output(tiny_model):
    cfg, model = tiny_model("discrete")
    tokens = random_tokens("discrete", 1, cfg)[:, :-1]
    a = model.backbone(torch.tensor([1]), tokens)
    b = model.backbone(torch.tensor([2]), tokens)
    assert ((a - b).abs().amax(dim=-1) > 1e-5).all()


def test_rope2d_pairs_rotate_with_one_axis():
    grid, head_dim = 4, 8
    freqs = rope2d_freqs(grid, head_dim)
    assert freqs.shape == (grid * grid + 1, 1, 1, head_dim)
    f = freqs[:, 0, 0]
    torch.testing.assert_close(f[:, :head_dim // 2], f[:, head_dim // 2:])  # rotate_half pairs i, i + d/2
    rows, cols = slot_rows_cols(grid)
    assert rows[0] == 0 and cols[0] == 0 and rows[1:].min() == 1 and cols[1:].min() == 1
    q = head_dim // 4
    # first quarter follows the row, second the column: slots in one row share the row angles
    same_row = (rows == 2).nonzero().flatten()
    assert torch.allclose(f[same_row, :q], f[same_row[0], :q].expand(len(same_row), q))
    assert not torch.allclose(f[same_row, q:2 * q], f[same_row[0], q:2 * q].expand(len(same_row), q))


def test_rope2d_rejects_head_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope2d_freqs(4, 6)


def test_bad_inputs_are_refused(tiny_model):
    cfg, model = tiny_model("discrete")
    tokens = random_tokens("discrete", 2, cfg)
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="token ids must be in"):
        model(tokens + 100, labels)
    with pytest.raises(ValueError, match="discrete tokens must be long"):
        model(tokens.float(), labels)
    with pytest.raises(ValueError, match="labels must be in"):
        model(tokens, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="sample_seeds must be"):
        model(tokens, labels, sample_seeds=torch.arange(3))
    with pytest.raises(ValueError, match="at most"):
        model.backbone(labels, tokens)


def test_config_refuses_rope2d_head_dim_not_multiple_of_4():
    from heptapod_ds.config.loader import ConfigError, load_config

    with pytest.raises(ConfigError, match="divisible by 4"):
        load_config(overrides=["backbone.width=24", "backbone.num_heads=4"], world_size=1)
    load_config(overrides=["backbone.width=24", "backbone.num_heads=4", "backbone.pos_embed=learned"], world_size=1)


def test_config_refuses_rope2d_head_positions_with_head_dim_not_multiple_of_4():
    from heptapod_ds.config.loader import ConfigError, load_config

    with pytest.raises(ConfigError, match="head.pos_embed=rope2d needs"):
        load_config(overrides=["head.width=24", "head.num_heads=4", "head.pos_embed=rope2d"], world_size=1)
    load_config(overrides=["head.width=24", "head.num_heads=4"], world_size=1)  # learned: any head dimension
