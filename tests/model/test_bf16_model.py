"""The model in bf16, as DeepSpeed's bf16 runs it (weights cast, inputs as the loader gives them): fp32
latents and diffusion noise meet bf16 weights, and the losses and samples stay in fp32."""
import pytest
import torch

from heptapod_ds.sampling import image_seeds
from model_helpers import HEAD_TYPES, random_tokens


@pytest.mark.parametrize("kind", ["continuous", "discrete"])
@pytest.mark.parametrize("head", HEAD_TYPES)
def test_bf16_model_trains_and_samples_from_fp32_inputs(tiny_model, kind, head):
    cfg, model = tiny_model(kind, head)
    tokens = random_tokens(kind, 4, cfg, torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 5, 9])
    seeds = image_seeds(0, range(4))
    loss32, _ = model(tokens, labels, seeds)
    model = model.to(torch.bfloat16)
    loss16, _ = model(tokens, labels, seeds)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    # the same draws through bf16 weights: within bf16's few significant digits of the fp32 loss
    assert abs(float(loss16) - float(loss32)) <= 0.05 * abs(float(loss32)), (float(loss16), float(loss32))
    loss16.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        samples = model.generate(labels[:2], seeds[:2], temperature=1.0, num_steps=5)
    assert samples.shape[0] == 2
    if kind == "continuous":
        assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
    else:
        assert samples.dtype == torch.long
