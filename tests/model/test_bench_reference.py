"""The bench's plain-PyTorch reference is the same network as the full stack (loss and gradients)."""
import pytest
import torch

from model_helpers import HEAD_TYPES, TOKEN_KINDS, random_tokens, randomize_zero_params, tiny_cfg


@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("head", HEAD_TYPES)
def test_plain_reference_gives_the_same_loss_and_grads(single_rank, kind, head):
    from heptapod_ds.bench.reference import plain_reference
    from heptapod_ds.model import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tiny_cfg(kind, head)
    model = build_model(cfg)
    randomize_zero_params(model)
    ref = plain_reference(model)
    assert sorted(n for n, _ in ref.named_parameters()) == sorted(n for n, _ in model.named_parameters())
    assert not any(type(m).__module__.startswith("megatron") for m in ref.modules())
    tokens = random_tokens(kind, 4, cfg, torch.Generator().manual_seed(1))
    labels, seeds = torch.tensor([1, 2, 3, 10]), torch.tensor([4, 5, 6, 7])
    losses = []
    for m in (model, ref):
        loss, _ = m(tokens, labels, sample_seeds=seeds)
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, a in model.named_parameters():
        b = ref_params[name]
        err = (a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{name}: {float(err):.2e}"
