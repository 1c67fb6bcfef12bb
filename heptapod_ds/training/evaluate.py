"""Class-conditional samples during and after training: a PNG grid (one row per class) and, on the
embedded digits data, class-consistency and Fréchet distance from :class:`DigitsJudge`.

All ranks sample (ZeRO-3 gathers parameters collectively): each data-parallel rank draws an equal
share of the labels, tensor-parallel peers draw identical samples, and the tokens are gathered to
rank 0, which alone decodes them (the grid and the digits scores are its work). Image i is seeded by
``image_seeds(sampling.seed, i)``, so the images do not depend on the number of data-parallel ranks or
on the batch size.

The tokenizer (the KL-16 / VQ decoder on ImageNet) is built once per trainer and kept on the model's
device; collectives move their tensors to the device the group's backend needs (CUDA for NCCL). On a
GPU the sampler runs with TF32 matmul/cuDNN (the weights are the engine's, bf16 in a bf16 run).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist

from heptapod_ds.distributed import parallel_state
from heptapod_ds.engine.faults import fault_point
from heptapod_ds.monitor import get_logger
from heptapod_ds.sampling import image_seeds

log = get_logger(__name__)

GRID_PER_CLASS = 10  # columns of the sample grid


def _gather_dp(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over the data-parallel group of ``x`` (equal shapes), on the collective's device
    during the gather (a host tensor over NCCL fails) and on ``x``'s device afterwards."""
    from heptapod_ds.evaluation.collectives import all_gather_equal

    if not dist.is_initialized():
        return x
    return all_gather_equal(x, parallel_state.dp_group())


def _tokenizer(trainer):
    """The run's tokenizer, built once per trainer (the KL-16 decoder's weights are read once, not at every
    evaluation) and kept on the trainer's device."""
    from heptapod_ds.tokenizers import build_tokenizer

    tok = trainer.__dict__.get("_eval_tokenizer")
    if tok is None:
        tok = build_tokenizer(trainer.cfg.tokenizer).to(trainer.device)
        trainer.__dict__["_eval_tokenizer"] = tok
    return tok


def _generate(trainer, labels: torch.Tensor):
    """Sample images for ``labels`` (the same list on every rank); returns the decoded images (on the host)
    on rank 0, None on the other ranks."""
    from heptapod_ds.sampling.source import sampler_math

    cfg, info = trainer.cfg, trainer.info
    n = labels.numel()
    per_rank = -(-n // info.dp_size)
    padded = torch.cat([labels, labels[: per_rank * info.dp_size - n]]) if per_rank * info.dp_size > n else labels
    start = info.dp_rank * per_rank
    mine = padded[start:start + per_rank].to(trainer.device)
    seeds = image_seeds(cfg.sampling.seed, range(start, start + per_rank))
    swap = trainer.ema.swap(trainer.engine) if (trainer.ema is not None and cfg.sampling.use_ema) \
        else contextlib.nullcontext()
    chunks = []
    trainer.engine.eval()
    preempt = getattr(trainer, "preempt", None)
    with swap, torch.no_grad(), sampler_math(trainer.device):
        for i in range(0, per_rank, cfg.sampling.batch_size):
            fault_point("eval.batch", i // cfg.sampling.batch_size)
            if preempt is not None:  # sampling can take long: a preemption signal must not wait for its end
                preempt.check("sampling")
            j = i + cfg.sampling.batch_size
            chunks.append(trainer.model.generate(mine[i:j], seeds[i:j]))
    trainer.engine.train()
    tokens = _gather_dp(torch.cat(chunks))[:n]
    if not parallel_state.is_rank0():
        return None
    with torch.no_grad(), sampler_math(trainer.device):
        return _tokenizer(trainer).decode(tokens.to(trainer.device)).float().clamp(0, 1).cpu()


@functools.lru_cache(maxsize=1)
def _digits_judge():
    """The digits classifier, trained once per process (seeded: every evaluation scores alike)."""
    from heptapod_ds.evaluation import DigitsJudge

    return DigitsJudge(seed=0)


def sample_and_score(trainer, final: bool) -> Dict[str, float]:
    """Sample, save the grid, score, and log one evaluation record at the trainer's step.

    Every evaluation of a run draws the same labels with the same per-image seeds, so the points of
    a curve differ only by the weights; the record carries the images seen and the training FLOPs so
    far (functions of the step, hence identical after a resume).
    """
    from heptapod_ds.evaluation import save_class_grid

    cfg = trainer.cfg
    num_classes = min(cfg.backbone.num_classes, 10)  # the grid shows the first ten classes
    on_digits = cfg.data.path == "digits"
    per_class = max(cfg.sampling.eval_per_class, GRID_PER_CLASS) if on_digits else GRID_PER_CLASS
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    t0 = time.time()
    images = _generate(trainer, labels)
    sample_s = time.time() - t0
    summary: Dict[str, float] = {"sample_s": sample_s, "num_samples": int(labels.numel())}
    if not parallel_state.is_rank0():
        return summary

    grid_idx = torch.cat([torch.arange(c * per_class, c * per_class + GRID_PER_CLASS) for c in range(num_classes)])
    name = "samples.png" if final else f"samples_step{trainer.step:07d}.png"
    upscale = 8 if images.shape[-1] <= 16 else 1  # make 8x8 digits visible
    path = save_class_grid(images[grid_idx].numpy(), os.path.join(cfg.run_dir, name), nrow=GRID_PER_CLASS,
                           upscale=upscale)
    log.info("wrote %s (%d samples in %.1fs)", path, labels.numel(), sample_s)
    record: Dict[str, float] = {"eval_samples": int(labels.numel()), **trainer.progress(), "sample_s": sample_s}
    if on_digits and images.shape[1] == 1 and images.shape[-1] == 8:
        judge = _digits_judge()
        score = judge.score(images.numpy(), labels.numpy())
        ref = judge.reference()
        summary.update(score.as_dict())
        summary.update(reference_class_consistency=ref.class_consistency,
                       reference_frechet_distance=ref.frechet_distance)
        record.update(class_consistency=score.class_consistency, frechet_distance=score.frechet_distance)
        log.info("digits quality at step %d: class-consistency %.3f, Fréchet distance %.3f (real held-out: %.3f, "
                 "%.3f)", trainer.step, score.class_consistency, score.frechet_distance, ref.class_consistency,
                 ref.frechet_distance)
    trainer.metrics.log(trainer.step, record)
    return summary


def _dp_all_reduce_stats(stats) -> None:
    stats.all_reduce(group=parallel_state.dp_group() if dist.is_initialized() else None)


def fid_during_training(trainer) -> Dict[str, float]:
    """``eval.fid_samples`` images, FID against ``eval.fid_ref`` (and the digits metrics on digits).

    Same rules as tools/sample_fid.py: image i has label ``i % C`` and seed ``image_seeds(sampling.seed, i)``;
    each data-parallel rank draws a contiguous share, extracts its features and adds them to float64
    sums, reduced over the data-parallel group. Logged to metrics.jsonl / wandb as ``fid`` (and
    ``fid_digits_class_consistency`` / ``fid_digits_frechet``). With ``eval.fid_sfid`` also ``sfid`` (the
    spatial features' statistics, reduced the same way), with ``eval.fid_precision_recall`` also
    ``precision`` / ``recall`` (ADM's k = 3 manifold estimate: pool features gathered to rank 0, against
    the reference images' features, computed once and cached in ``run_dir/fid_ref_features.npz``).
    Each rank decodes, on its device, the images it scores.
    """
    from heptapod_ds.evaluation import FeatureStats, frechet_distance_from_stats
    from heptapod_ds.evaluation.extractors import build_extractor
    from heptapod_ds.evaluation.reference import load_reference
    from heptapod_ds.sampling.fid_run import to_uint8_hwc
    from heptapod_ds.sampling.labels import class_balanced_labels
    from heptapod_ds.sampling.source import sampler_math

    cfg, info = trainer.cfg, trainer.info
    ev = cfg.eval
    n = ev.fid_samples
    per_rank = -(-n // info.dp_size)
    start, stop = min(n, info.dp_rank * per_rank), min(n, (info.dp_rank + 1) * per_rank)
    labels = class_balanced_labels(n, cfg.backbone.num_classes, start, stop).to(trainer.device)
    seeds = image_seeds(cfg.sampling.seed, range(start, stop))
    cache = trainer.__dict__.setdefault("_fid_cache", {})
    if "extractor" not in cache:
        cache["extractor"] = build_extractor(ev.fid_inception, device=trainer.device) if ev.fid_ref else None
        cache["ref"] = load_reference(os.path.expanduser(ev.fid_ref)) if ev.fid_ref else None
    tokenizer, extractor, ref = _tokenizer(trainer), cache["extractor"], cache["ref"]
    want_sfid = extractor is not None and getattr(ev, "fid_sfid", False)
    want_pr = extractor is not None and getattr(ev, "fid_precision_recall", False)
    t0 = time.time()
    swap = trainer.ema.swap(trainer.engine) if (trainer.ema is not None and cfg.sampling.use_ema) \
        else contextlib.nullcontext()
    images = []
    trainer.engine.eval()
    with swap, torch.no_grad(), sampler_math(trainer.device):
        for i in range(0, stop - start, cfg.sampling.batch_size):
            j = min(i + cfg.sampling.batch_size, stop - start)
            tokens = trainer.model.generate(labels[i:j], seeds[i:j])
            images.append(to_uint8_hwc(tokenizer.decode(tokens)))
    trainer.engine.train()
    size = cfg.tokenizer.image_size
    mine = np.concatenate(images) if images else np.zeros((0, size, size, 3), np.uint8)
    out: Dict[str, float] = {"fid_samples": n, **trainer.progress()}  # curves against steps, images and FLOPs
    if extractor is not None:
        stats = FeatureStats(extractor.dim)
        sstats = FeatureStats(extractor.spatial_dim) if want_sfid else None
        feats = extractor.features(mine, spatial=want_sfid) if len(mine) else None
        if feats is not None:
            stats.add(feats["pool"])
            if sstats is not None:
                sstats.add(feats["spatial"])
        _dp_all_reduce_stats(stats)
        if sstats is not None:
            _dp_all_reduce_stats(sstats)
        if parallel_state.is_rank0():
            mu, sigma = stats.mean_cov()
            out["fid"] = frechet_distance_from_stats(mu, sigma, ref.mu, ref.sigma)
            if sstats is not None:
                out["sfid"] = frechet_distance_from_stats(*sstats.mean_cov(), ref.mu_s, ref.sigma_s)
        if want_pr:
            pool = feats["pool"] if feats is not None else torch.zeros(0, extractor.dim)
            out.update(_precision_recall_in_training(trainer, cache, extractor, ref, pool))
    if cfg.data.path == "digits" and size == 8:  # the same on every rank: all join the gather
        full = _gather_dp(_pad_to(torch.from_numpy(mine), per_rank))
        if parallel_state.is_rank0():
            imgs = full.reshape(-1, *mine.shape[1:])[:n].numpy()
            judge = _digits_judge()
            score = judge.score(imgs[..., 0].astype(np.float64)[:, None] / 255.0,
                                class_balanced_labels(n, cfg.backbone.num_classes).numpy())
            out.update(fid_digits_class_consistency=score.class_consistency,
                       fid_digits_frechet=score.frechet_distance)
    out["fid_s"] = time.time() - t0
    if parallel_state.is_rank0():
        trainer.metrics.log(trainer.step, out)
        log.info("in-training FID at step %d: %s", trainer.step,
                 ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out


def _precision_recall_in_training(trainer, cache, extractor, ref, pool: torch.Tensor) -> Dict[str, float]:
    """Precision/recall of this evaluation's samples (every data-parallel rank's contiguous share, gathered
    to rank 0 in rank order = image order) against the reference images."""
    from heptapod_ds.evaluation.collectives import gather_rows
    from heptapod_ds.evaluation.precision_recall import precision_recall
    from heptapod_ds.evaluation.reference import reference_pool_features

    group = parallel_state.dp_group() if dist.is_initialized() else None
    if "ref_pool" not in cache:
        path = os.path.join(trainer.cfg.run_dir, "fid_ref_features.npz")
        cache["ref_pool"] = reference_pool_features(ref, extractor, path, group=group)
    everyone = gather_rows(pool, group) if group is not None else pool
    if not parallel_state.is_rank0():
        return {}
    pr = precision_recall(cache["ref_pool"], everyone, device=extractor.device)
    return {"precision": pr.precision, "recall": pr.recall}


def _pad_to(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Pad ``x`` with zero rows to ``rows`` (all_gather needs equal shapes on every rank)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, torch.zeros((rows - x.shape[0], *x.shape[1:]), dtype=x.dtype)])
