"""The vectorised supervision plan: per-sample, deterministic, uniform over timesteps, same layout as before."""
import numpy as np
import pytest
import torch

from heptapod_ds.model.counter_rng import bits, seed_keys, uniform
from heptapod_ds.model.supervision import draw_plan


def _gens(seeds):
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _image_plan(plan, b):
    rows = plan.sample == b
    return plan.timesteps[b].tolist(), (plan.rows[rows] % plan.timesteps.shape[1]).tolist(), plan.slots[rows].tolist()


@pytest.mark.parametrize("window", [None, 5])
def test_image_plan_depends_on_its_seed_only(window):
    seeds = [3, 99, 7, 12345678901]
    batch = draw_plan(_gens(seeds), 64, 4, 6, window)
    for b, seed in enumerate(seeds):
        alone = draw_plan(_gens([seed]), 64, 4, 6, window)
        assert _image_plan(batch, b) == _image_plan(alone, 0)
    again = draw_plan(_gens(seeds), 64, 4, 6, window)
    assert all(torch.equal(getattr(batch, f), getattr(again, f)) for f in ("timesteps", "rows", "slots", "counts"))
    other = draw_plan(_gens([s + 1 for s in seeds]), 64, 4, 6, window)
    assert not torch.equal(other.timesteps, batch.timesteps)


def test_layout_grouped_by_image_next_slot_first():
    plan = draw_plan(_gens(range(8)), 16, 3, 4, None)
    assert torch.equal(plan.sample, torch.sort(plan.sample).values)
    assert torch.equal(torch.bincount(plan.sample, minlength=8), plan.counts)
    ts = plan.timesteps.reshape(-1)
    for r in plan.rows.unique():
        slots = plan.slots[plan.rows == r]
        assert int(slots[0]) == int(ts[r]) + 1 and torch.equal(slots, torch.sort(slots).values)


def test_timesteps_and_positions_are_uniform():
    n, t_count, k = 16, 2, 3
    plan = draw_plan(_gens(range(4000)), n, t_count, k, None)
    hist = torch.bincount(plan.timesteps.reshape(-1), minlength=n).float()
    expected = 4000 * t_count / n
    assert (hist - expected).abs().max() < 5 * expected ** 0.5          # ~5 sigma
    # among the others (not t+1) at t = 0, every slot 2..n is equally likely
    rows_t = plan.timesteps.reshape(-1)[plan.rows]
    others = plan.slots[(rows_t == 0) & (plan.slots > 1)]
    counts = torch.bincount(others, minlength=n + 1)[2:].float()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()


def test_none_generators_draw_from_the_global_rng():
    torch.manual_seed(0)
    a = draw_plan([None, None], 64, 4, 6, None)
    torch.manual_seed(0)
    b = draw_plan([None, None], 64, 4, 6, None)
    assert torch.equal(a.slots, b.slots) and a.timesteps.shape == (2, 4)


def test_counter_streams_are_distinct_per_lane_and_key():
    keys = seed_keys([0, 1])
    c = np.arange(1000, dtype=np.uint64)
    assert not np.array_equal(bits(keys[0], 1, c), bits(keys[1], 1, c))
    assert not np.array_equal(bits(keys[0], 1, c), bits(keys[0], 2, c))
    u = uniform(keys[0], 1, np.arange(100000, dtype=np.uint64))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
