"""Issue 20, item 5 (model/layers.py): TransformerConfig gets the run's precision (bf16 -> megatron's bf16 with the
softmax in fp32), and transformer_impl=auto is megatron's local layers even where TransformerEngine imports."""
import torch

from heptapod_ds.model import layers


def test_bf16_runs_tell_megatron_and_keep_the_softmax_in_fp32():
    kw = dict(depth=1, width=32, num_heads=4, mlp_ratio=4.0, dropout=0.0, norm_eps=1e-6, tensor_parallel=1)
    bf16 = layers.make_transformer_config(**kw, precision="bf16")
    fp32 = layers.make_transformer_config(**kw)
    assert bf16.bf16 and bf16.attention_softmax_in_fp32 and bf16.params_dtype == torch.float32
    assert not fp32.bf16 and fp32.attention_softmax_in_fp32


def test_run_precision_follows_the_config():
    from heptapod_ds.config.loader import load_config

    assert layers.run_precision(load_config(overrides=["parallel.precision=bf16"], world_size=1)) == "bf16"
    auto = layers.run_precision(load_config(overrides=[], world_size=1))
    assert auto == ("bf16" if torch.cuda.is_available() else "fp32")


def test_auto_is_local_even_when_transformer_engine_imports(monkeypatch, caplog):
    monkeypatch.setattr(layers, "transformer_engine_available", lambda: True)
    layers._log_te_switch_once.cache_clear()
    with caplog.at_level("INFO"):
        assert layers.resolve_impl("auto", "auto") == layers.LayerImpl("local", "sdpa")
    assert "backbone.transformer_impl=transformer_engine" in caplog.text
