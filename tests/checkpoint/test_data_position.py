"""The data position is saved per global batch, so a run resumed with another DP size / micro batch /
accumulation continues with the samples an uninterrupted run would see."""
import numpy as np
import pytest

from heptapod_ds.config import load_config
from heptapod_ds.data.order import rank_epoch_indices
from heptapod_ds.training.data_stream import resume_micro_step


def _cfg(world, *extra):
    return load_config(overrides=["train.global_batch_size=16", "train.micro_batch_size=4", "train.grad_accum=0",
                                  *extra], world_size=world)


def test_global_position_maps_to_each_layouts_micro_step():
    saved = {"epoch": 2, "global_batches": 3, "global_batch_size": 16}
    assert resume_micro_step(saved, _cfg(1)) == {"epoch": 2, "micro_step": 12}      # accum 4
    assert resume_micro_step(saved, _cfg(4)) == {"epoch": 2, "micro_step": 3}       # accum 1
    assert resume_micro_step(saved, _cfg(2, "train.micro_batch_size=8")) == {"epoch": 2, "micro_step": 3}


def test_samples_after_the_position_are_the_same_for_every_dp_size():
    n, seed, epoch, consumed = 100, 7, 1, 3
    seen = {}
    for dp, micro in ((1, 4), (2, 4), (4, 2)):
        accum = 16 // (micro * dp)
        start = resume_micro_step({"epoch": epoch, "global_batches": consumed, "global_batch_size": 16},
                                  _cfg(dp, f"train.micro_batch_size={micro}"))["micro_step"]
        rows = [rank_epoch_indices(n, seed, epoch, micro, accum, r, dp, True).reshape(-1, micro)[start:start + accum]
                for r in range(dp)]
        seen[dp] = np.sort(np.concatenate([r.reshape(-1) for r in rows]))  # the next global batch
    assert np.array_equal(seen[1], seen[2]) and np.array_equal(seen[1], seen[4])


def test_changed_global_batch_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="global_batch_size=32"):
        resume_micro_step({"epoch": 0, "global_batches": 1, "global_batch_size": 32}, _cfg(1))


def test_old_per_rank_positions_still_load():
    assert resume_micro_step({"epoch": 1, "micro_step": 5}, _cfg(1)) == {"epoch": 1, "micro_step": 5}
