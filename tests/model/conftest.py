"""Model tests run tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a busy 2-core box."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model(single_rank):
    """Factory: build_model(tiny_cfg(...)) with every gradient path live."""
    from heptapod_ds.model import build_model
    from model_helpers import randomize_zero_params, tiny_cfg

    def make(kind="discrete", head="global", **extra):
        torch.manual_seed(0)
        cfg = tiny_cfg(kind, head, **extra)
        model = build_model(cfg)
        randomize_zero_params(model)
        return cfg, model
    return make
