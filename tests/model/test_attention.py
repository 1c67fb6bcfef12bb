"""backbone.attention=sdpa equals megatron's unfused core attention (loss, gradients, KV-cache decoding)."""
import pytest
import torch

from model_helpers import HEAD_TYPES, TOKEN_KINDS, random_tokens, randomize_zero_params, tiny_cfg


def _pair(kind, head):
    """The same weights under attention=megatron and attention=sdpa."""
    from heptapod_ds.model import build_model

    torch.manual_seed(0)
    ref = build_model(tiny_cfg(kind, head, **{"backbone.attention": "megatron"}))
    randomize_zero_params(ref)
    fast = build_model(tiny_cfg(kind, head, **{"backbone.attention": "sdpa"}))
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in fast.named_parameters()]
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("head", HEAD_TYPES)
def test_sdpa_matches_megatron_loss_and_grads(single_rank, kind, head):
    from heptapod_ds.model.attention import SDPACoreAttention

    ref, fast = _pair(kind, head)
    cores = [m for m in fast.modules() if isinstance(m, SDPACoreAttention)]
    expected_layers = 2 + (0 if head == "next" else 2)
    ref_cores = [m for m in ref.modules() if isinstance(m, SDPACoreAttention)]
    assert len(cores) == expected_layers
    # the local head's attention is SDPA whatever backbone.attention says (it splits the packed groups)
    assert len(ref_cores) == (2 if head == "local" else 0)
    cfg = tiny_cfg(kind, head)
    tokens = random_tokens(kind, 4, cfg, torch.Generator().manual_seed(3))
    labels, seeds = torch.tensor([0, 3, 9, 10]), torch.tensor([5, 6, 7, 8])
    losses = []
    for model in (ref, fast):
        loss, _ = model(tokens, labels, sample_seeds=seeds)
        loss.backward()
        losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
        err = (p_fast.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{kind}/{head} {name}: relative gradient error {float(err):.2e}"


@pytest.mark.parametrize("head", ["global", "local"])
def test_sdpa_kv_cache_decoding_matches_megatron(single_rank, head):
    """Head outputs (the sampling conditions) from the SDPA KV-cache path equal megatron's full recompute."""
    from heptapod_ds.model.heptapod import _make_cache

    ref, fast = _pair("continuous", head)
    cfg = tiny_cfg("continuous", head)
    n = cfg.tokenizer.num_tokens
    tokens = random_tokens("continuous", 2, cfg, torch.Generator().manual_seed(0))[:, :n - 1]
    labels = torch.tensor([3, 10])
    ref.eval(), fast.eval()
    with torch.no_grad():
        cache = _make_cache(2, n)
        steps = [fast.backbone(labels, tokens[:, :t], start=t, inference_context=cache) for t in range(n)]
        o_fast = torch.cat(steps, dim=1)
        o_ref = ref.backbone(labels, tokens)
        assert (o_fast - o_ref).abs().max() <= 1e-5
        for t in (0, 5, n - 2):
            ts = torch.full((2, 1), t)
            z_fast, z_ref = fast.head(o_fast, ts), ref.head(o_ref, ts)
            assert (z_fast - z_ref).abs().max() <= 1e-5


def test_fewer_queries_than_keys_is_bottom_right_causal(single_rank):
    from heptapod_ds.model.attention import SDPACoreAttention
    from heptapod_ds.model.layers import make_transformer_config
    from megatron.core.transformer.enums import AttnMaskType

    config = make_transformer_config(depth=1, width=16, num_heads=2, mlp_ratio=2, dropout=0.0, norm_eps=1e-6,
                                     tensor_parallel=1)
    core = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, 1, 2, 8, generator=g) for s in (3, 5, 5))
    out = core(q, k, v, None).reshape(3, 2, 8)
    scores = torch.einsum("qhd,khd->hqk", q[:, 0], k[:, 0]) / 8 ** 0.5
    blocked = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2).logical_not()
    ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(blocked, float("-inf")).softmax(-1), v[:, 0])
    assert (out - ref).abs().max() <= 1e-6


def test_attention_config_is_checked():
    from heptapod_ds.config.loader import ConfigError, load_config
    from heptapod_ds.model.layers import LayerImpl, resolve_impl

    with pytest.raises(ConfigError, match="backbone.attention='flash'"):
        load_config(overrides=["backbone.attention=flash"], world_size=1)
    with pytest.raises(ConfigError, match="attention=te needs TransformerEngine"):
        load_config(overrides=["backbone.attention=te", "backbone.transformer_impl=local"], world_size=1)
    assert resolve_impl("local", "auto") == LayerImpl("local", "sdpa")
    assert resolve_impl("local", "megatron") == LayerImpl("local", "megatron")
    if not torch.cuda.is_available():
        assert resolve_impl("auto", "auto") == LayerImpl("local", "sdpa")
        with pytest.raises(RuntimeError, match="attention=te needs TransformerEngine"):
            resolve_impl("auto", "te")
