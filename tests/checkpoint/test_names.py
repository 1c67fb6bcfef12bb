"""Canonical names do not depend on the layer implementation; the parameter table knows TP split dims."""
import torch

from heptapod_ds.checkpoint.names import ParamSpec, from_canonical, model_spec, to_canonical


def test_transformer_engine_names_map_to_local_ones_and_back():
    pairs = {
        "backbone.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight":
            "backbone.decoder.layers.3.input_layernorm.weight",
        "head.decoder.layers.0.mlp.linear_fc1.layer_norm_bias": "head.decoder.layers.0.pre_mlp_layernorm.bias",
        "backbone.decoder.layers.1.mlp.linear_fc1.weight": "backbone.decoder.layers.1.mlp.linear_fc1.weight",
    }
    for te, local in pairs.items():
        assert to_canonical(te) == local and to_canonical(local) == local
        assert from_canonical(local, "transformer_engine") == te and from_canonical(local, "local") == local


def test_parameter_table_has_full_shapes_and_split_dims(single_rank):
    from heptapod_ds.config import load_config

    cfg = load_config(overrides=["backbone.depth=1", "head.depth=1"], world_size=1)
    specs = {s.name: s for s in model_spec(cfg)}
    w = cfg.backbone.width
    assert specs["backbone.decoder.layers.0.self_attention.linear_qkv.weight"].split_dim == 0
    assert specs["backbone.decoder.layers.0.self_attention.linear_proj.weight"].split_dim == 1
    assert specs["backbone.decoder.layers.0.mlp.linear_fc2.bias"].split_dim is None
    assert specs["backbone.decoder.layers.0.mlp.linear_fc1.weight"].shape == (int(w * cfg.backbone.mlp_ratio), w)
    assert specs["backbone.class_embed.weight"].decay is False and specs["head.input_proj.weight"].decay is True


def test_shard_and_join_invert_each_other():
    spec = ParamSpec("w", (4, 6), 1, 0)
    full = torch.arange(24.0).view(4, 6)
    parts = [spec.shard(full, 2, r) for r in range(2)]
    assert parts[0].shape == spec.local_shape(2) == (4, 3)
    assert torch.equal(spec.join(parts), full)


def test_transformer_engine_order_puts_each_fused_norm_before_its_linear():
    from heptapod_ds.checkpoint.names import te_extra_state_names, te_parameter_order

    layer = "backbone.decoder.layers.0."
    local = [layer + n for n in ("input_layernorm.weight", "input_layernorm.bias",
                                 "self_attention.linear_proj.weight",
                                 "self_attention.linear_proj.bias", "self_attention.linear_qkv.weight",
                                 "self_attention.linear_qkv.bias", "pre_mlp_layernorm.weight",
                                 "pre_mlp_layernorm.bias", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
    te = [from_canonical(n, "transformer_engine") for n in te_parameter_order(local)]
    assert te == [layer + n for n in (
        "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
        "self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.layer_norm_bias",
        "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
        "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.layer_norm_bias", "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight")]
    assert [to_canonical(n) for n in te] == te_parameter_order(local)
    assert te_extra_state_names(local, "te") == [layer + "self_attention.core_attention._extra_state"]
    assert te_extra_state_names(local, "sdpa") == []
