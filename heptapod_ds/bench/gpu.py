"""The GPU row: the largest preset that fits one device, bf16, fastest attention; MFU, images/s, memory.

On a GPU it tries preset H, then XL, L, B, each at micro batch 32, 16, 8, and measures the first that
runs; then, on the same engine, saves a checkpoint, steps, resumes and steps again (the two losses must
agree: exact resume), and samples two images (the first-GPU-run checklist of the README). The engine is
DeepSpeed ZeRO-0, world 1, bf16, ``backbone.attention=auto`` (TransformerEngine when installed, else
SDPA's flash kernels). MFU is against the device's listed bf16 peak and against a bf16 matmul
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
        return train_step(engine, [(tokens, labels, seeds)], lambda eng, mb: eng(mb[0], mb[1], draws=draws)[0],
                          guard)

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
        from heptapod_ds.cost.plan import per_rank

        row["memory_predicted_gib"] = per_rank(cfg, device=device)["total_bytes"] / 2 ** 30
        row.update(_checkpoint_resume_sample(cfg, engine, step, device))
        return row
    finally:
        del engine
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _checkpoint_resume_sample(cfg, engine, step, device: str) -> Dict:
    """The rest of a first GPU run on the same engine: save a checkpoint, take one step, load the checkpoint,
    take the same step again (its loss must be the same: exact resume), then sample two images with the
    KV cache. Timed; the checkpoint lives in a temporary directory that is removed afterwards."""
    import dataclasses
    import tempfile

    from heptapod_ds.engine import CheckpointManager

    with tempfile.TemporaryDirectory(prefix="heptapod_bench_") as tmp:
        run_cfg = dataclasses.replace(cfg, run_dir=tmp,
                                      checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))
        ckpt = CheckpointManager(run_cfg)
        t0 = time.perf_counter()
        ckpt.save(engine, 1, {"step": 1})
        save_s = time.perf_counter() - t0
        first = step()
        t0 = time.perf_counter()
        ckpt.load(engine)
        load_s = time.perf_counter() - t0
        again = step()
    model = engine.module
    labels = torch.tensor([1, 2], device=device)
    from heptapod_ds.sampling.seeds import image_seeds

    _sync(device)
    t0 = time.perf_counter()
    model.eval()
    try:
        tokens = model.generate(labels, image_seeds(0, range(2)))
    finally:
        model.train()
    _sync(device)
    return {"checkpoint_save_s": save_s, "checkpoint_load_s": load_s,
            "resume_exact": bool(first.loss == again.loss), "losses_after_save_and_resume": [first.loss, again.loss],
            "sample_s_per_image": (time.perf_counter() - t0) / 2, "sampled_tokens": list(tokens.shape)}


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
