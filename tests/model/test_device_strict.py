"""The GPU paths of the model, checked on CPU: training forward + backward, a pipeline stage and sampling
run with the model and its inputs on a stand-in device (``meta``) under
:class:`heptapod_ds.distributed.strict_device.StrictDeviceMode`. A host tensor mixed into the device
arithmetic, or a device value read on the host, fails the check (as it would crash or stall a GPU)."""
import pytest
import torch

from heptapod_ds.distributed.strict_device import STAND_IN, DeviceStrictError, strict_device
from heptapod_ds.model.draws import draw_batch
from model_helpers import HEAD_TYPES, TOKEN_KINDS, random_tokens

SEEDS = torch.arange(4) * 7 + 3


def _on_stand_in(cfg, model, kind):
    g = torch.Generator().manual_seed(1)
    tokens = random_tokens(kind, 4, cfg, g)
    labels = torch.randint(0, 10, (4,), generator=g)
    draws = draw_batch(cfg, 4, SEEDS, training=True)   # the trainer's loader-side draws, on the host
    model.to(STAND_IN)
    return tokens.to(STAND_IN), labels.to(STAND_IN), draws.to(STAND_IN)


@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("head", HEAD_TYPES)
def test_training_forward_and_backward_stay_on_the_device(tiny_model, kind, head):
    cfg, model = tiny_model(kind, head, **{"backbone.class_dropout": 0.2, "backbone.dropout": 0.1})
    tokens, labels, draws = _on_stand_in(cfg, model, kind)
    with strict_device():
        loss, stats = model(tokens, labels, draws=draws)
        loss.backward()
    assert loss.device == STAND_IN and set(stats) == {"loss", "supervised_per_image"}
    assert all(p.grad is not None and p.grad.device == STAND_IN for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind,head", [("discrete", "local"), ("continuous", "global")])
def test_pipeline_stages_stay_on_the_device(single_rank, kind, head):
    from heptapod_ds.model.heptapod import HeptapodModel
    from heptapod_ds.pipeline.split import split_model
    from heptapod_ds.pipeline.stage import PipelineStage
    from model_helpers import randomize_zero_params, tiny_cfg

    torch.manual_seed(0)
    cfg = tiny_cfg(kind, head)
    split = split_model(cfg, stages=2, split="3,1")  # the head's input on stage 1: the shape changes there
    full = HeptapodModel(cfg)
    randomize_zero_params(full)
    stages = []
    for k in range(2):
        part = HeptapodModel(cfg)
        part.load_state_dict(full.state_dict())
        stages.append(PipelineStage(part, split, k))
    tokens, labels, draws = _on_stand_in(cfg, stages[0], kind)
    stages[1].to(STAND_IN)
    with strict_device():
        h, _ = stages[0](tokens, labels, draws=draws)
        sent = h.detach().requires_grad_()
        stages[1].set_input_tensor(sent)
        loss, _ = stages[1](tokens, labels, draws=draws)
        loss.backward()
        h.backward(sent.grad)
    assert sent.grad.shape == h.shape


@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("head", ["global", "local"])
def test_sampling_stays_on_the_device(tiny_model, kind, head):
    cfg, model = tiny_model(kind, head)
    model.eval().to(STAND_IN)
    labels = torch.tensor([1, 2, 3]).to(STAND_IN)
    with strict_device():
        tokens = model.generate(labels, torch.tensor([11, 12, 13]), num_steps=3 if kind == "continuous" else None)
    assert tokens.device == STAND_IN


def test_the_check_catches_host_tensors_and_host_reads(single_rank):
    x = torch.randn(4, 3, device=STAND_IN)
    with strict_device():
        with pytest.raises(DeviceStrictError, match="host tensor"):
            x + torch.arange(3)
        with pytest.raises(DeviceStrictError, match="host tensor"):
            x[torch.tensor([0, 1])]
        with pytest.raises(DeviceStrictError, match="read on the host"):
            x.sum().item()
        with pytest.raises(DeviceStrictError, match="copied to the host"):
            x.cpu()
        x + torch.tensor(2.0)  # a 0-dim host scalar is what CUDA accepts too
