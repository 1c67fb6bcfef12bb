"""Sampling rows: images/s with and without the KV cache (interleaved), and where the time goes.

The time shares come from timing the backbone, the head and the per-token output (the classifier or
the diffusion sampler) inside one cached generation; "other" is the rest (sampling from logits, loop).
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch

from .timing import interleave, ratio_summary, summary


def _timed(module, method: str, bucket: Dict[str, float], key: str):
    original = getattr(module, method)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket[key] += time.perf_counter() - t0
    setattr(module, method, wrapper)
    return lambda: delattr(module, method)  # the instance attribute shadowed the class method


def shares(model, labels, seeds, **kw) -> Dict[str, float]:
    bucket = {"backbone": 0.0, "head": 0.0, "output": 0.0}
    undo = [_timed(model.backbone, "forward", bucket, "backbone")]
    if model.head is not None:
        undo.append(_timed(model.head, "forward", bucket, "head"))
    undo.append(_timed(model.output, "forward", bucket, "output"))
    if hasattr(model.output, "sample"):
        undo.append(_timed(model.output, "sample", bucket, "output"))
    t0 = time.perf_counter()
    try:
        model.generate(labels, seeds, use_kv_cache=True, **kw)
    finally:
        for u in undo:
            u()
    total = time.perf_counter() - t0
    out = {k: v / total for k, v in bucket.items()}
    out["other"] = max(0.0, 1.0 - sum(out.values()))
    return out


def run(name: str, overrides: List[str], batch: int, repeats: int, **gen_kwargs) -> List[Dict]:
    """Rows ``sampling/<name>/{kv_cache,no_cache}``; call inside a 1-rank world."""
    from heptapod_ds.config import load_config
    from heptapod_ds.model import build_model

    cfg = load_config(overrides=overrides, world_size=1)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    labels = torch.arange(batch) % cfg.backbone.num_classes
    seeds = torch.arange(batch)
    fns = {"kv_cache": lambda: model.generate(labels, seeds, use_kv_cache=True, **gen_kwargs),
           "no_cache": lambda: model.generate(labels, seeds, use_kv_cache=False, **gen_kwargs)}
    times = interleave(fns, repeats, warmup=1)
    split = shares(model, labels, seeds, **gen_kwargs)
    rows = []
    for key in ("kv_cache", "no_cache"):
        s = summary(times[key])
        row = {"row": f"sampling/{name}/{key}", "batch": batch, "images_per_s": batch / s["median"], "batch_s": s}
        if key == "kv_cache":
            row["speedup_over_no_cache"] = ratio_summary(times["no_cache"], times["kv_cache"])
            row["time_share"] = split
        rows.append(row)
    return rows
