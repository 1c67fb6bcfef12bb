import pytest
import torch
from torch import nn

from heptapod_ds.engine import EMA


def test_decay_warms_up_then_caps():
    ema = EMA(nn.Linear(2, 2), decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.num_updates = 400
    assert ema.current_decay() == pytest.approx(401 / 410)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999


def test_short_run_ema_tracks_the_weights():
    model = nn.Linear(4, 4)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        for _ in range(400):
            model.weight.add_(0.01)
            ema.update()
    # the EMA lags the weights by about its warm-up window, not by the whole run
    lag = (model.weight - ema.shadow[0].view_as(model.weight)).mean().item()
    assert 0 < lag < 0.5
