"""Tokenizers: strict loading of public-layout checkpoints, clear errors, encode/decode round trips."""
import pytest
import torch

from heptapod_ds.config.schema import TokenizerConfig
from heptapod_ds.tokenizers import (KL16Tokenizer, PatchTokenizer, PixelTokenizer, TokenizerCheckpointError,
                                    VQ16Tokenizer, build_tokenizer, moments_to_tokens)


def _save(module, path, wrap="model"):
    torch.save({wrap: module.state_dict()} if wrap else module.state_dict(), path)
    return str(path)


def test_kl16_public_layout():
    """Parameter names/shapes of MAR's kl16.ckpt (66M parameters) at the public width."""
    vae = KL16Tokenizer(load_weights=False).vae
    sd = vae.state_dict()
    assert sum(v.numel() for v in sd.values()) == 66_456_019
    assert sd["encoder.down.4.attn.1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.down.0.downsample.conv.weight"].shape == (128, 128, 3, 3)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["decoder.up.4.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert sd["quant_conv.weight"].shape == (32, 32, 1, 1) and sd["post_quant_conv.weight"].shape == (16, 16, 1, 1)
    assert not any(".attn." in k for k in sd if k.startswith("decoder.up"))


def test_vq16_public_layout():
    """Parameter names/shapes of LlamaGen's vq_ds16_c2i.pt (72M parameters incl. the usage buffer)."""
    sd = VQ16Tokenizer(load_weights=False).vq.state_dict()
    assert sum(v.numel() for v in sd.values()) == 71_883_403 + 65_536
    assert sd["quantize.embedding.weight"].shape == (16384, 8)
    assert sd["quantize.codebook_used"].shape == (65536,)
    assert sd["encoder.conv_blocks.4.attn.1.k.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.conv_blocks.0.attn.2.v.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.conv_blocks.0.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in sd
    assert sd["encoder.mid.1.norm.weight"].shape == (512,)
    assert sd["quant_conv.weight"].shape == (8, 256, 1, 1)


def test_kl16_strict_load_and_encode(tmp_path):
    ref = KL16Tokenizer(image_size=32, ch=32, load_weights=False)
    ckpt = _save(ref.vae, tmp_path / "kl16.ckpt")
    tok = KL16Tokenizer(image_size=32, ch=32, ckpt=ckpt)
    x = torch.rand(2, 3, 32, 32)
    moments = tok.encode(x)
    assert moments.shape == (2, 32, 2, 2)
    assert torch.equal(moments, ref.encode(x))
    tokens = tok.to_model_tokens(moments)  # posterior mean x scale
    assert tokens.shape == (2, 4, 16)
    assert torch.allclose(tokens, moments[:, :16].flatten(2).transpose(1, 2) * 0.2325)
    assert tok.decode(tokens).shape == (2, 3, 32, 32)
    out = tok.decode(tokens)
    assert out.min() >= 0 and out.max() <= 1


def test_kl16_drops_training_only_keys(tmp_path):
    ref = KL16Tokenizer(image_size=32, ch=32, load_weights=False)
    sd = dict(ref.vae.state_dict(), **{"loss.discriminator.main.0.weight": torch.zeros(3)})
    torch.save({"model": sd}, tmp_path / "kl16.ckpt")
    KL16Tokenizer(image_size=32, ch=32, ckpt=str(tmp_path / "kl16.ckpt"))


def test_checkpoint_errors_name_file_format_and_source(tmp_path):
    with pytest.raises(TokenizerCheckpointError, match="tokenizer.ckpt is not set.*LTH14/mar"):
        KL16Tokenizer(image_size=32, ch=32)
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(TokenizerCheckpointError, match=f"'{missing}' does not exist.*kl16.ckpt"):
        KL16Tokenizer(image_size=32, ch=32, ckpt=str(missing))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a torch file")
    with pytest.raises(TokenizerCheckpointError, match="cannot be read by torch.load"):
        VQ16Tokenizer(image_size=32, ch=32, z_channels=32, ckpt=str(garbage))
    wider = _save(KL16Tokenizer(image_size=32, ch=64, load_weights=False).vae, tmp_path / "wide.ckpt")
    with pytest.raises(TokenizerCheckpointError, match=r"shape mismatch: .*file \(64, 3, 3, 3\) vs model \(32, 3, 3, 3\)"):
        KL16Tokenizer(image_size=32, ch=32, ckpt=wider)
    vq = _save(VQ16Tokenizer(image_size=32, ch=32, z_channels=32, load_weights=False).vq, tmp_path / "vq.pt")
    with pytest.raises(TokenizerCheckpointError, match=r"does not match the kl16 architecture: \d+ missing"):
        KL16Tokenizer(image_size=32, ch=32, ckpt=vq)
    with pytest.raises(TokenizerCheckpointError, match="huggingface.co/FoundationVision/LlamaGen"):
        VQ16Tokenizer(image_size=32, ch=32, z_channels=32, ckpt=wider)


def test_vq16_strict_load_bare_state_dict_and_round_trip(tmp_path):
    ref = VQ16Tokenizer(image_size=32, ch=32, z_channels=32, load_weights=False)
    ckpt = _save(ref.vq, tmp_path / "vq_ds16_c2i.pt", wrap=None)
    tok = VQ16Tokenizer(image_size=32, ch=32, z_channels=32, ckpt=ckpt)
    x = torch.rand(3, 3, 32, 32)
    codes = tok.encode(x)
    assert codes.shape == (3, 2, 2) and codes.dtype == torch.long
    assert torch.equal(codes, ref.encode(x))
    assert int(codes.max()) < 16384
    tokens = tok.to_model_tokens(codes)
    assert tokens.shape == (3, 4)
    assert tok.decode(tokens).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16384\)"):
        tok.decode(torch.full((1, 4), 16384))


def test_pixel_round_trip_is_exact():
    tok = PixelTokenizer(image_size=8, vocab_size=17)
    levels = torch.randint(0, 17, (4, 1, 8, 8))
    codes = tok.encode(levels.float() / 16)
    assert torch.equal(codes, levels[:, 0])
    assert torch.equal(tok.decode(tok.to_model_tokens(codes)), levels.float() / 16)
    with pytest.raises(ValueError, match=r"expects images \[B, 1, 8, 8\]"):
        tok.encode(torch.rand(2, 3, 8, 8))


def test_patch_round_trip_and_deterministic_posterior():
    tok = PatchTokenizer(image_size=8, stride=2, channels=12)
    x = torch.rand(2, 3, 8, 8)
    moments = tok.encode(x)
    assert moments.shape == (2, 24, 4, 4)
    noisy = moments_to_tokens(moments, torch.randn(2, 12, 4, 4), tok.scale_factor)
    assert noisy.shape == (2, 16, 12)
    assert torch.allclose(tok.decode(noisy), x, atol=1e-5)
    digits = PatchTokenizer(image_size=8, stride=1, channels=1)
    v = torch.randint(0, 17, (1, 1, 8, 8)).float()
    assert torch.allclose(digits.to_model_tokens(digits.encode(v / 16))[0, :, 0], (v / 16 * 2 - 1).flatten())


def test_build_tokenizer_checks_fixed_architectures():
    with pytest.raises(ValueError, match="tokenizer.stride=1 \\(must be 16\\)"):
        build_tokenizer(TokenizerConfig(name="kl16", image_size=256, stride=1, channels=16), load_weights=False)
    with pytest.raises(ValueError, match="stride\\^2 x image channels"):
        build_tokenizer(TokenizerConfig(name="patch", image_size=8, stride=2, channels=5))
    tok = build_tokenizer(TokenizerConfig())  # the tiny default: digits pixels
    assert isinstance(tok, PixelTokenizer) and tok.stored_shape == (8, 8) and tok.stored_dtype.name == "int16"
