"""The train loader: (seed, epoch)-determined order, exact resume, DP-size invariance, TP x DP sharding."""
import numpy as np
import pytest
import torch

from dist_harness import run_ranks
from heptapod_ds.config import load_config
from heptapod_ds.data import build_train_loader
from heptapod_ds.data.order import rank_epoch_indices


def _cfg(world_size=1, *extra):
    return load_config(overrides=["train.micro_batch_size=32", "train.global_batch_size=64",
                                  "train.grad_accum=0", "data.num_workers=1", *extra], world_size=world_size)


def _epoch(loader):
    return [(t.clone(), y.clone(), i.clone()) for t, y, i in loader]


def test_order_is_a_function_of_seed_and_epoch():
    cfg = _cfg()
    a, b = build_train_loader(cfg, 0, 1), build_train_loader(cfg, 0, 1)
    assert a.steps_per_epoch == 1797 // 64 * 2 == 56
    ea, eb = _epoch(a), _epoch(b)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(ea, eb))
    ids = torch.cat([x[2] for x in ea])
    assert len(set(ids.tolist())) == len(ids) == 56 * 32  # no repeats within an epoch
    a.set_epoch(1)
    assert not torch.equal(_epoch(a)[0][2], ea[0][2])
    other_seed = build_train_loader(_cfg(1, "data.seed=5"), 0, 1)
    assert not torch.equal(_epoch(other_seed)[0][2], ea[0][2])


def test_resume_mid_epoch_yields_exactly_the_remaining_batches():
    cfg = _cfg(1, "tokenizer.name=patch")
    full = build_train_loader(cfg, 0, 1, start_epoch=2)
    reference = _epoch(full)
    k = 13
    partial = build_train_loader(cfg, 0, 1, start_epoch=2)
    seen = []
    for step, batch in enumerate(partial):  # stop in the middle, as a killed run would
        if step == k:
            break
        seen.append(batch[2].clone())
    resumed = _epoch(build_train_loader(cfg, 0, 1, start_epoch=2, start_step=k))
    assert len(resumed) == len(reference) - k
    for ref, got in zip(reference[k:], resumed):
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]) and torch.equal(ref[2], got[2])
    assert all(torch.equal(a, b[2]) for a, b in zip(seen, reference[:k]))


def test_same_global_batch_same_samples_for_any_dp_size():
    """dp=1 x accum 2 and dp=2 x accum 1 see the same samples and the same tokens per optimizer step."""
    cfg1 = _cfg(1, "tokenizer.name=patch")
    cfg2 = _cfg(2, "tokenizer.name=patch")
    assert cfg1.train.grad_accum == 2 and cfg2.train.grad_accum == 1
    one = _epoch(build_train_loader(cfg1, 0, 1))
    two = [_epoch(build_train_loader(cfg2, r, 2)) for r in range(2)]
    for s in range(len(two[0])):
        ids1 = torch.cat([one[2 * s][2], one[2 * s + 1][2]])
        ids2 = torch.cat([two[0][s][2], two[1][s][2]])
        assert torch.equal(ids1, ids2)
        assert torch.equal(torch.cat([one[2 * s][0], one[2 * s + 1][0]]), torch.cat([two[0][s][0], two[1][s][0]]))


def test_posterior_noise_and_flip_depend_on_sample_not_position():
    from heptapod_ds.data.order import flip_choices, posterior_noise

    idx = np.array([5, 17, 900])
    a = posterior_noise(0, 3, idx, (4, 2, 2))
    b = posterior_noise(0, 3, idx[::-1].copy(), (4, 2, 2))
    assert torch.equal(a, b.flip(0)) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, posterior_noise(0, 4, idx, (4, 2, 2)))
    flips = flip_choices(0, 0, np.arange(10000))
    assert 0.45 < flips.mean() < 0.55


def test_bad_positions_are_errors():
    loader = build_train_loader(_cfg(), 0, 1)
    with pytest.raises(ValueError, match="start_step=999 must lie in"):
        loader.set_epoch(0, start_step=999)
    with pytest.raises(ValueError, match="dp_rank=2 must lie in"):
        build_train_loader(_cfg(), 2, 2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_loader(load_config(overrides=["train.micro_batch_size=2048", "train.global_batch_size=2048"],
                                       world_size=1), 0, 1)


def _tp2_dp2_body(rank, world_size):
    from heptapod_ds.distributed import parallel_state

    info = parallel_state.initialize(tensor=2, pipeline=1, seed=0)
    cfg = _cfg(world_size, "parallel.tensor=2", "tokenizer.name=patch")
    loader = build_train_loader(cfg, info.dp_rank, info.dp_size)
    ids, digests = [], []
    for tokens, labels, sample_ids in loader:
        ids.append(sample_ids.tolist())
        digests.append(float(tokens.double().sum()) + 1000.0 * float(labels.sum()))
    return {"tp": info.tp_rank, "dp": info.dp_rank, "ids": ids, "digests": digests}


@pytest.mark.slow
def test_tp2_dp2_sharding_on_four_ranks():
    results = run_ranks(_tp2_dp2_body, world_size=4, timeout=300)
    by_dp = {}
    for r in results:
        by_dp.setdefault(r["dp"], []).append(r)
    assert sorted(by_dp) == [0, 1]
    for peers in by_dp.values():  # TP peers: identical batches
        assert len(peers) == 2 and peers[0]["ids"] == peers[1]["ids"] and peers[0]["digests"] == peers[1]["digests"]
    sets = [{i for batch in by_dp[d][0]["ids"] for i in batch} for d in (0, 1)]
    assert not sets[0] & sets[1]  # disjoint
    covered = len(sets[0] | sets[1])
    assert covered == 1797 // 64 * 64  # all but the drop_last tail
    expected = set(rank_epoch_indices(1797, 0, 0, 32, 1, 0, 2, True)) | set(rank_epoch_indices(1797, 0, 0, 32, 1, 1, 2, True))
    assert sets[0] | sets[1] == expected
