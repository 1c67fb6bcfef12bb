"""The loader's random paths: horizontal flips and posterior noise on a beton with a real posterior variance.

The digits' ``patch`` moments have a log-variance of -30 (std 3e-7), so they cannot show whether noise
is drawn, nor whether a resumed or re-sharded run draws the same noise. These tests build a beton of
the digits whose log-variance is real (std 0.14-0.37) and compare full token tensors. They hold for any
implementation in which the randomness is a function of (data.seed, epoch, sample index): they never
call the loader's own noise or flip functions.
"""
import math

import numpy as np
import pytest
import torch

from heptapod_ds.config import load_config
from heptapod_ds.data import build_train_loader


def _noisy_tokenizer():
    from heptapod_ds.tokenizers.pixels import PatchTokenizer

    class NoisyPatch(PatchTokenizer):
        """The patch tokenizer with a log-variance of mean - 3 (std exp((m - 3) / 2) in [0.14, 0.37])."""

        @torch.no_grad()
        def encode(self, images):
            mean = super().encode(images).chunk(2, dim=1)[0]
            return torch.cat([mean, mean - 3.0], dim=1)

    return NoisyPatch(image_size=8, stride=1, channels=1)


@pytest.fixture(scope="module")
def noisy_beton(tmp_path_factory):
    from heptapod_ds.config.schema import TokenizerConfig
    from heptapod_ds.data.pretokenize import Coordinator, PretokenizeOptions, pretokenize
    from heptapod_ds.data.sources import DigitsSource

    path = str(tmp_path_factory.mktemp("noisy") / "digits_noisy.beton")
    opts = PretokenizeOptions(batch_size=512, shard_size=4096, decode_workers=1, write_workers=1, force=True,
                              progress=False, device="cpu")
    pretokenize(DigitsSource(), _noisy_tokenizer(), TokenizerConfig(name="patch", channels=1), path, opts,
                Coordinator())
    return path


def _cfg(beton, world_size=1, *extra):
    return load_config(overrides=["tokenizer.name=patch", "tokenizer.channels=1", f"data.path={beton}",
                                  "data.random_flip=true", "tokenizer.scale_factor=0.5", "train.micro_batch_size=32",
                                  "train.global_batch_size=64", "train.grad_accum=0", "data.num_workers=1", *extra],
                       world_size=world_size)


def _epoch(loader):
    return [(t.clone(), y.clone(), i.clone()) for t, y, i in loader]


def _stored(beton):
    """(moments, moments_flip) of every row, [n, 2, 8, 8] each, read without the training loader."""
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    names = list(Reader(beton).handlers)
    out = {"moments": [], "moments_flip": []}
    for batch in Loader(beton, batch_size=512, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False):
        for k in out:
            out[k].append(batch[names.index(k)].clone())
    return torch.cat(out["moments"]), torch.cat(out["moments_flip"])


def _standardised(tokens, ids, stored, scale):
    """Per sample: the view it was drawn from (0 image, 1 flip) and its standardised noise z [B, 64]."""
    views = torch.stack(stored, 1)[ids]                       # [B, 2 views, 2C, 8, 8]
    mean, logvar = views[:, :, 0].flatten(2), views[:, :, 1].flatten(2)   # [B, 2, 64]
    x = tokens[..., 0].unsqueeze(1) / scale                  # [B, 1, 64]
    z = (x - mean) / torch.exp(0.5 * logvar)
    view = (z ** 2).sum(-1).argmin(1)                         # the view that explains the sample
    return view, z[torch.arange(len(ids)), view]


def test_noise_is_drawn_from_the_posterior_and_flips_are_fair(noisy_beton):
    """The kl16-like path: tokens = (mean + std * eps) * scale with eps ~ N(0, 1), fresh per epoch."""
    from scipy import stats

    cfg = _cfg(noisy_beton)
    stored = _stored(noisy_beton)
    loader = build_train_loader(cfg, 0, 1)
    tokens, _, ids = (torch.cat(x) for x in zip(*_epoch(loader)))
    view, z = _standardised(tokens, ids, stored, 0.5)
    flat = z.flatten().double()
    assert len(flat) == 56 * 32 * 64
    assert abs(float(flat.mean())) < 0.01 and abs(float(flat.std()) - 1.0) < 0.01, (flat.mean(), flat.std())
    assert stats.kstest(flat[::7].numpy(), "norm").pvalue > 1e-3
    assert abs(float(stats.kurtosis(flat.numpy()))) < 0.05  # Gaussian tails, not a uniform or a clipped draw
    # the view choice: about half flipped, and each sample's z is far better explained by its view
    asym = (stored[0][ids, 0] - stored[1][ids, 0]).abs().flatten(1).amax(1) > 0.5
    frac = float(view[asym].float().mean())
    assert 0.45 < frac < 0.55, frac
    # next epoch: fresh noise and fresh flips for the same samples
    loader.set_epoch(1)
    t1, _, ids1 = (torch.cat(x) for x in zip(*_epoch(loader)))
    view1, z1 = _standardised(t1, ids1, stored, 0.5)
    e0 = {int(i): (int(v), zz) for i, v, zz in zip(ids, view, z)}
    e1 = {int(i): (int(v), zz) for i, v, zz in zip(ids1, view1, z1)}
    common = sorted(set(e0) & set(e1))
    assert len(common) > 1700
    corr = float(torch.corrcoef(torch.stack([torch.cat([e0[i][1] for i in common]),
                                             torch.cat([e1[i][1] for i in common])]))[0, 1])
    assert abs(corr) < 0.02, corr
    asym_ids = set(ids[asym].tolist())
    changed = [e0[i][0] != e1[i][0] for i in common if i in asym_ids]
    assert 0.4 < sum(changed) / len(changed) < 0.6
    # without random_flip every sample is read as stored, still with noise
    plain = build_train_loader(_cfg(noisy_beton, 1, "data.random_flip=false"), 0, 1)
    tp, _, idp = next(iter(plain))
    vp, zp = _standardised(tp, idp, stored, 0.5)
    assert int(vp.sum()) == 0 and 0.8 < float(zp.std()) < 1.2


def test_mid_epoch_resume_gives_the_same_tokens(noisy_beton):
    cfg = _cfg(noisy_beton)
    reference = _epoch(build_train_loader(cfg, 0, 1, start_epoch=3))
    k = 17
    resumed = _epoch(build_train_loader(cfg, 0, 1, start_epoch=3, start_step=k))
    assert len(resumed) == len(reference) - k
    for ref, got in zip(reference[k:], resumed):
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]) and torch.equal(ref[2], got[2])
    # the tokens are noisy (not the stored mean) and a different epoch draws different ones
    other = _epoch(build_train_loader(cfg, 0, 1, start_epoch=4))
    assert not torch.equal(torch.cat([r[0] for r in reference]), torch.cat([o[0] for o in other]))


def test_any_dp_size_sees_the_same_tokens(noisy_beton):
    """dp=1 x accum 2 and dp=2 x accum 1: identical noisy, flipped tokens per optimizer step."""
    one = _epoch(build_train_loader(_cfg(noisy_beton, 1), 0, 1))
    two = [_epoch(build_train_loader(_cfg(noisy_beton, 2), r, 2)) for r in range(2)]
    for s in range(len(two[0])):
        for field in range(3):
            assert torch.equal(torch.cat([one[2 * s][field], one[2 * s + 1][field]]),
                               torch.cat([two[0][s][field], two[1][s][field]]))


def _tp2_dp2_tokens(rank, world_size, beton):
    from heptapod_ds.distributed import parallel_state

    info = parallel_state.initialize(tensor=2, pipeline=1, seed=0)
    cfg = _cfg(beton, world_size, "parallel.tensor=2")
    epoch = _epoch(build_train_loader(cfg, info.dp_rank, info.dp_size, start_epoch=1))
    return {"tp": info.tp_rank, "dp": info.dp_rank, "tokens": torch.stack([b[0] for b in epoch]),
            "labels": torch.stack([b[1] for b in epoch]), "ids": torch.stack([b[2] for b in epoch])}


@pytest.mark.slow
def test_tp_peers_read_identical_noisy_flipped_batches_and_dp_ranks_disjoint_shards(noisy_beton):
    from dist_harness import run_ranks

    results = run_ranks(_tp2_dp2_tokens, world_size=4, args=(noisy_beton,), timeout=600)
    by_dp = {}
    for r in results:
        by_dp.setdefault(r["dp"], []).append(r)
    assert sorted(by_dp) == [0, 1]
    single = _cfg(noisy_beton, 4, "parallel.tensor=2")  # what each DP rank of the 4-rank world must read, here alone
    for dp, peers in by_dp.items():
        assert len(peers) == 2
        for key in ("tokens", "labels", "ids"):
            assert torch.equal(peers[0][key], peers[1][key]), f"TP peers of dp {dp} differ in {key}"
        alone = _epoch(build_train_loader(single, dp, 2, start_epoch=1))
        assert torch.equal(peers[0]["tokens"], torch.stack([b[0] for b in alone]))
    ids = [set(by_dp[d][0]["ids"].flatten().tolist()) for d in (0, 1)]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 1797 // 64 * 64
    noise = by_dp[0][0]["tokens"].std()
    assert math.isfinite(float(noise))
