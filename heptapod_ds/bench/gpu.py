"""The GPU row: the largest preset that fits one device, bf16, fastest attention; MFU, images/s, memory.

On a GPU it tries preset H, then XL, L, B, each at micro batch 32, 16, 8, and measures the first that
runs (DeepSpeed ZeRO-0, world 1, bf16, ``backbone.attention=auto``: TransformerEngine when installed,
else SDPA's flash kernels). MFU is against the device's listed bf16 peak and against a bf16 matmul
peak measured in the same run. On CPU (``--device cpu``) the same code runs the tiny preset in fp32,
so CI knows it starts.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Dict, List

import torch

log = logging.getLogger(__name__)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, size: int, dtype) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * size ** 3 / best


def _attempt(device: str, preset: str, micro_batch: int, steps: int) -> Dict:
    from heptapod_ds.config import load_config
    from heptapod_ds.engine import NonFiniteGuard, build_engine, train_step
    from heptapod_ds.model import build_model
    from heptapod_ds.cost.flops import train_flops_per_image

    from .train import _batch

    precision = "bf16" if device == "cuda" else "fp32"
    cfg = load_config(overrides=[f"preset={preset}", "parallel.zero_stage=0", f"parallel.precision={precision}",
                                 f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch}",
                                 "train.grad_accum=1", "train.ema_decay=0", "backbone.attention=auto"],
                      world_size=1)
    engine, _, _ = build_engine(cfg, lambda: build_model(cfg))
    from heptapod_ds.model.draws import draw_batch

    tokens, labels, seeds = _batch(cfg, micro_batch)
    # as the trainer does: the draws made on the host from the seeds, then copied with the batch
    draws = draw_batch(cfg, micro_batch, seeds, training=True).to(device)
    tokens, labels = tokens.to(device), labels.to(device)
    guard = NonFiniteGuard(5)

    def step():
        train_step(engine, [(tokens, labels, seeds)], lambda eng, mb: eng(mb[0], mb[1], draws=draws)[0], guard)

    try:
        step()
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        times.sort()
        median = times[len(times) // 2]
        flops = train_flops_per_image(cfg)
        from heptapod_ds.model.layers import resolve_impl
        impl = resolve_impl(cfg.backbone.transformer_impl, cfg.backbone.attention)
        row = {"preset": preset, "micro_batch": micro_batch, "precision": precision, "layers": str(impl),
               "step_s": {"median": median, "min": times[0], "max": times[-1], "n": len(times)},
               "images_per_s": micro_batch / median, "achieved_flops_per_s": flops * micro_batch / median}
        if device == "cuda":
            row["memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        return row
    finally:
        del engine
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def run(device: str, quick: bool) -> List[Dict]:
    from heptapod_ds.training.throughput import peak_tflops

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible; use --device cpu.")
    candidates = [("H", 32), ("H", 16), ("H", 8), ("XL", 16), ("L", 16), ("B", 16)] if device == "cuda" \
        else [("tiny", 8)]
    steps = (3 if quick else 10) if device == "cuda" else 2
    row, tried = None, []
    for preset, mb in candidates:
        try:
            row = _attempt(device, preset, mb, steps)
            break
        except torch.cuda.OutOfMemoryError if device == "cuda" else MemoryError:
            tried.append(f"{preset}@{mb}: out of memory")
            log.info("gpu bench: %s micro batch %d does not fit, trying smaller", preset, mb)
    if row is None:
        raise RuntimeError(f"no preset fitted: {tried}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    measured = matmul_peak(device, 8192 if device == "cuda" else 256, dtype)
    row.update({"row": f"gpu/{device}", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "did_not_fit": tried, "matmul_peak_flops_per_s": measured,
                "mfu_vs_measured_matmul": row["achieved_flops_per_s"] / measured})
    listed = peak_tflops()
    if listed:
        row["mfu"] = row["achieved_flops_per_s"] / (listed * 1e12)
    return [row]
