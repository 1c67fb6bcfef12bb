"""The FID sampler's GPU settings, checked on the CPU build: bf16 parameters (buffers kept fp32) and TF32
only where the device is CUDA; fp32 and untouched flags on the CPU; a bf16 sampler still draws valid
images of both token kinds."""
import os
import sys

import pytest
import torch

from heptapod_ds.sampling.source import cast_weights, sampler_math, sampler_precision


def test_precision_is_bf16_on_cuda_only():
    assert sampler_precision(torch.device("cuda", 0)) == "bf16"
    assert sampler_precision("cpu") == "fp32" and sampler_precision(None) == "fp32"
    assert sampler_precision("cuda", "fp32") == "fp32" and sampler_precision("cpu", "bf16") == "bf16"
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        sampler_precision("cpu", "fp16")


def _flags():
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    return (m.fp32_precision, c.fp32_precision) if hasattr(m, "fp32_precision") else \
        (m.allow_tf32, torch.backends.cudnn.allow_tf32)


def test_tf32_inside_the_sampler_on_cuda_only_and_restored():
    before = _flags()
    with sampler_math(torch.device("cpu")):
        assert _flags() == before
    with sampler_math(torch.device("cuda", 0)):       # flags only: no GPU is touched
        assert _flags() in (("tf32", "tf32"), (True, True))
    assert _flags() == before
    with pytest.raises(RuntimeError, match="boom"), sampler_math("cuda"):
        raise RuntimeError("boom")
    assert _flags() == before


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_bf16_sampler_draws_valid_images(kind, single_rank):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
    from heptapod_ds.model import build_model
    from heptapod_ds.sampling import image_seeds
    from model_helpers import randomize_zero_params, tiny_cfg

    cfg = tiny_cfg(kind, "global")
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize_zero_params(model)
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    cast_weights(model, "bf16").eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {n: b.dtype for n, b in model.named_buffers()} == buffers       # rotary tables etc. unchanged
    with torch.no_grad():
        tokens = model.generate(torch.arange(3), image_seeds(0, range(3)), num_steps=5)
    if kind == "discrete":
        assert tokens.dtype == torch.long and 0 <= int(tokens.min()) and int(tokens.max()) < cfg.tokenizer.vocab_size
    else:
        assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()   # the DDPM chain stays fp32
    assert cast_weights(model, "fp32") is model
