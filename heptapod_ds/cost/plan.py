"""The capacity plan of a config on a GPU cluster: memory per rank, step time, days, FID-50K cost.

Pure arithmetic on the cost model (:mod:`.flops`, :mod:`.memory`): no model, no torch. The most loaded
rank is found over the pipeline stages: stage r holds min(pp - r, m) micro-batches in flight under 1F1B
(m = gradient-accumulation micro-batches), its own parameters (split as the pipeline does), and the
per-token output on the last stage.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

from . import flops as F
from .memory import activation_bytes, model_state_bytes

GIB = 2 ** 30
IMAGENET_TRAIN = 1281167
# Held back from the device's memory before anything is planned: the allocator's fragmentation and
# cached blocks (10% of the device) and the CUDA context, NCCL buffers and kernels' workspaces (2 GiB).
ALLOCATOR_FRACTION = 0.10
RESERVED_BYTES = 2 * GIB
REDUCE_BUCKET = 500_000_000      # ds_configs/zero{1,2,3}.json reduce_bucket_size (elements)
ALLGATHER_BUCKET = 500_000_000   # ds_configs/zero{1,2}.json allgather_bucket_size
PREFETCH_BUCKET = 50_000_000     # ds_configs/zero3.json stage3_prefetch_bucket_size
RECOMPUTE_SETTINGS = {
    "none": {"granularity": "none", "method": "uniform", "num_layers": 1},
    "selective": {"granularity": "selective", "method": "uniform", "num_layers": 1},
    "full": {"granularity": "full", "method": "uniform", "num_layers": 1},
}


def usable_bytes(gpu_memory_gib: float) -> float:
    """What the planner lets a rank use of a device of ``gpu_memory_gib``."""
    return gpu_memory_gib * GIB * (1 - ALLOCATOR_FRACTION) - RESERVED_BYTES


def _stage_layers(cfg):
    """[(backbone range, head range, has_output)] per pipeline stage, as the pipeline splits."""
    from heptapod_ds.pipeline.split import split_model

    split = split_model(cfg)
    out = []
    for s in split.stages:
        bb = s.layer_indices("backbone")
        hd = s.layer_indices("head")
        out.append((bb, hd, s.has("output"), s.has("embed"), s.has("head_input")))
    return out


def _stage_params(cfg, stage) -> int:
    """Parameters one TP rank of ``stage`` holds."""
    bb, hd, has_output, has_embed, has_head_input = stage
    tp = cfg.parallel.tensor
    counts = F.param_counts(cfg, tp)
    s, r = F.layer_params(cfg.backbone.width, cfg.backbone.mlp_ratio)
    total = len(bb) * (s // tp + r)
    final_ln = 2 * cfg.backbone.width  # the stack's final LayerNorm lives with its last layer
    if has_embed:
        total += counts["backbone"]["replicated"] - cfg.backbone.depth * r - final_ln
    if cfg.backbone.depth - 1 in bb:
        total += final_ln
    if cfg.head.type != "next":
        hs, hr = F.layer_params(cfg.head.width, cfg.head.mlp_ratio)
        total += len(hd) * (hs // tp + hr)
        if has_head_input:
            total += counts["head"]["replicated"] - cfg.head.depth * hr - 2 * cfg.head.width
        if cfg.head.depth - 1 in hd:
            total += 2 * cfg.head.width
    if has_output:
        total += counts["diffusion"]["total"]
    return total


def _largest_layer_params(cfg) -> int:
    s, r = F.layer_params(cfg.backbone.width, cfg.backbone.mlp_ratio)
    big = s + r
    if cfg.head.type != "next":
        hs, hr = F.layer_params(cfg.head.width, cfg.head.mlp_ratio)
        big = max(big, hs + hr)
    return max(big, F.param_counts(cfg)["diffusion"]["total"])


def per_rank(cfg, micro_batch: Optional[int] = None, device: str = "cuda") -> Dict[str, Any]:
    """The memory of the most loaded rank (bytes), by kind and by part."""
    par, tr = cfg.parallel, cfg.train
    mb = micro_batch or tr.micro_batch_size
    world = par.world_size
    dp = max(1, world // par.model_parallel)
    accum = max(1, tr.global_batch_size // (mb * dp))
    precision = "bf16" if par.precision in ("auto", "bf16") and device == "cuda" else par.precision
    if precision == "auto":
        precision = "fp32"
    p_bytes = 2 if precision == "bf16" else 4
    best = None
    stages = _stage_layers(cfg)
    for r, stage in enumerate(stages):
        bb, hd, has_output = stage[0], stage[1], stage[2]
        params = _stage_params(cfg, stage)
        states = model_state_bytes(cfg, dp, precision, stage_params=params)
        acts = activation_bytes(cfg, mb, device=device, precision=precision,
                                layers={"backbone": bb, "head": hd}, with_output=has_output)
        inflight = min(par.pipeline - r, accum)
        if par.zero_stage == 3:
            buffers = (2 * _largest_layer_params(cfg) + PREFETCH_BUCKET + REDUCE_BUCKET) * p_bytes
        elif par.zero_stage in (1, 2):
            buffers = (REDUCE_BUCKET + (ALLGATHER_BUCKET if par.zero_stage else 0)) * p_bytes
            buffers = min(buffers, 2 * params * p_bytes)  # a bucket never exceeds the rank's parameters
        else:
            buffers = min(REDUCE_BUCKET, params) * p_bytes if dp > 1 else 0
        row = {"stage": r, "params_bytes": states["params"], "grads_bytes": states["grads"],
               "optimizer_bytes": states["optimizer"], "activations_bytes": acts["total"] * inflight,
               "activations_by_part": {k: acts[k] * inflight for k in ("backbone", "head", "output")},
               "activations_per_microbatch": acts["total"], "inflight_microbatches": inflight,
               "buffers_bytes": buffers}
        row["total_bytes"] = (row["params_bytes"] + row["grads_bytes"] + row["optimizer_bytes"]
                              + row["activations_bytes"] + row["buffers_bytes"])
        if best is None or row["total_bytes"] > best["total_bytes"]:
            best = row
    best.update({"precision": precision, "micro_batch": mb, "grad_accum": accum, "data_parallel": dp})
    return best


def with_recompute(cfg, setting: Dict[str, Any]):
    c = copy.deepcopy(cfg)
    for k, v in setting.items():
        setattr(c.recompute, k, v)
    return c


def largest_micro_batch(cfg, gpu_memory_gib: float, device: str = "cuda", limit: int = 1024) -> int:
    """The largest micro batch whose most loaded rank fits (0: not even 1)."""
    budget = usable_bytes(gpu_memory_gib)
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if per_rank(cfg, mid, device)["total_bytes"] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def make_plan(cfg, gpu_memory_gib: float = 80.0, mfu: float = 0.40, epochs: float = 800,
              dataset_size: int = IMAGENET_TRAIN, peak_tflops: float = 989.0, device: str = "cuda") -> Dict[str, Any]:
    """Everything ``python -m heptapod_ds.plan`` prints (the JSON layout of the issue)."""
    par, tr = cfg.parallel, cfg.train
    rank = per_rank(cfg, device=device)
    budget = usable_bytes(gpu_memory_gib)
    world = par.world_size
    m = rank["grad_accum"]
    train_per_image = F.train_flops_per_image(cfg) + F.recompute_flops_per_image(cfg)
    flops_per_step = train_per_image * tr.global_batch_size
    compute_s = flops_per_step / (world * peak_tflops * 1e12 * mfu)
    bubble = (par.pipeline - 1) / m if par.pipeline > 1 else 0.0
    step_time = compute_s * (1 + bubble)
    images_per_s = tr.global_batch_size / step_time
    days = epochs * dataset_size / images_per_s / 86400
    fid_gpu_hours = 50000 * F.sample_flops_per_image(cfg) / (peak_tflops * 1e12 * mfu) / 3600
    largest = {name: largest_micro_batch(with_recompute(cfg, s), gpu_memory_gib, device)
               for name, s in RECOMPUTE_SETTINGS.items()}
    fits = rank["total_bytes"] <= budget
    plan = {
        "preset": cfg.preset, "gpus": world, "tensor": par.tensor, "pipeline": par.pipeline,
        "data_parallel": rank["data_parallel"], "zero_stage": par.zero_stage,
        "micro_batch": rank["micro_batch"], "grad_accum": m, "global_batch": tr.global_batch_size,
        "recompute": {"granularity": cfg.recompute.granularity, "method": cfg.recompute.method,
                      "num_layers": cfg.recompute.num_layers, "parts": cfg.recompute.parts},
        "precision": rank["precision"], "gpu_memory_gib": gpu_memory_gib,
        "usable_bytes": budget,
        "margin": f"{ALLOCATOR_FRACTION:.0%} of the device for the allocator + {RESERVED_BYTES / GIB:.0f} GiB "
                  f"for the CUDA context, NCCL and workspaces",
        "per_rank": {k: rank[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                                          "activations_by_part", "inflight_microbatches", "buffers_bytes",
                                          "total_bytes")},
        "most_loaded_stage": rank["stage"],
        "fits": fits, "headroom": 1 - rank["total_bytes"] / (gpu_memory_gib * GIB),
        "largest_micro_batch": largest,
        "mfu": mfu, "peak_tflops": peak_tflops,
        "train_flops_per_image": train_per_image,
        "step_time_s": step_time, "pipeline_bubble": bubble, "images_per_s": images_per_s,
        "epochs": epochs, "dataset_size": dataset_size, "days": days,
        "fid50k_gpu_hours": fid_gpu_hours,
    }
    plan["advice"] = advice(cfg, plan, gpu_memory_gib, device) if not fits else []
    return plan


def advice(cfg, plan, gpu_memory_gib: float, device: str = "cuda") -> List[str]:
    """What to change when it does not fit, cheapest first (each option checked with the planner)."""
    budget = usable_bytes(gpu_memory_gib)
    out = []
    for name in ("selective", "full"):
        c = with_recompute(cfg, RECOMPUTE_SETTINGS[name])
        if per_rank(c, device=device)["total_bytes"] <= budget:
            out.append(f"recompute.granularity={name} (costs {F.recompute_flops_per_image(c) / F.train_flops_per_image(c):.0%} "
                       f"more FLOPs)")
            break
    mb = plan["largest_micro_batch"]["none"]
    if mb >= 1:
        out.append(f"train.micro_batch_size={mb} (or smaller; grad_accum follows)")
    elif plan["largest_micro_batch"]["full"] >= 1:
        out.append(f"recompute.granularity=full with train.micro_batch_size={plan['largest_micro_batch']['full']}")
    if cfg.parallel.zero_stage < 3 and cfg.parallel.pipeline == 1:
        c = copy.deepcopy(cfg)
        c.parallel.zero_stage = 3
        if per_rank(c, device=device)["total_bytes"] <= budget:
            out.append("parallel.zero_stage=3")
    for tp in (2, 4, 8):
        if tp > cfg.parallel.tensor and cfg.backbone.num_heads % tp == 0 and cfg.parallel.world_size % (tp * cfg.parallel.pipeline) == 0:
            c = copy.deepcopy(cfg)
            c.parallel.tensor = tp
            if per_rank(c, device=device)["total_bytes"] <= budget:
                out.append(f"parallel.tensor={tp}")
                break
    return out or ["nothing the planner tried fits: more GPUs (data parallel does not shrink activations), "
                   "a smaller preset or pipeline parallelism"]


def refusal(cfg, gpu_memory_gib: float, device: str = "cuda") -> Optional[str]:
    """None when ``cfg`` is predicted to fit, else the message naming the cheapest fix."""
    if per_rank(cfg, device=device)["total_bytes"] <= usable_bytes(gpu_memory_gib):
        return None
    plan = make_plan(cfg, gpu_memory_gib=gpu_memory_gib, device=device)
    total = plan["per_rank"]["total_bytes"] / GIB
    return (f"predicted {total:.1f} GiB per rank (most loaded: pipeline stage {plan['most_loaded_stage']}), more than the "
            f"{plan['usable_bytes'] / GIB:.1f} GiB usable of {gpu_memory_gib:g} GiB ({plan['margin']}). Cheapest fix: "
            f"{'; or '.join(plan['advice'])}. See `python -m heptapod_ds.plan` for the table.")


def startup_lines(cfg, gpu_memory_gib: Optional[float] = None, device: str = "cuda") -> List[str]:
    """What rank 0 logs at start-up: memory per rank by part and the predicted step time."""
    gib = gpu_memory_gib or cfg.parallel.gpu_memory_gib or 80.0
    plan = make_plan(cfg, gpu_memory_gib=gib, device=device)
    r = plan["per_rank"]
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["activations_by_part"].items())
    return [f"memory plan (per rank, GiB, {plan['precision']} on a {gib:g} GiB GPU): parameters "
            f"{r['params_bytes'] / GIB:.2f}, gradients {r['grads_bytes'] / GIB:.2f}, optimizer "
            f"{r['optimizer_bytes'] / GIB:.2f}, activations {r['activations_bytes'] / GIB:.2f} ({parts}; "
            f"{r['inflight_microbatches']} in flight), buffers {r['buffers_bytes'] / GIB:.2f}, total "
            f"{r['total_bytes'] / GIB:.2f} of {plan['usable_bytes'] / GIB:.1f} usable "
            f"({'fits' if plan['fits'] else 'does NOT fit'})",
            f"predicted step {plan['step_time_s']:.3f} s at {plan['mfu']:.0%} MFU of {plan['peak_tflops']:g} TFLOP/s "
            f"({plan['images_per_s']:.0f} images/s; {plan['days']:.1f} days for {plan['epochs']:g} epochs of "
            f"ImageNet-1k)"]


def log_startup_plan(cfg, logger=None) -> None:
    """Log :func:`startup_lines` (call on rank 0 before the process group; never fails the run)."""
    import logging

    logger = logger or logging.getLogger("heptapod_ds.plan")
    try:
        for line in startup_lines(cfg):
            logger.info(line)
    except Exception as e:  # noqa: BLE001 - a planning gap must not stop training
        logger.warning("memory plan unavailable: %s", e)


TEMPLATE_HEADROOM = 0.15


def size_template(cfg, gpu_memory_gib: float = 80.0, headroom: float = TEMPLATE_HEADROOM, device: str = "cuda"):
    """(micro batch, recompute granularity) a Slurm template should default to: the largest micro batch that
    divides the per-rank batch and leaves ``headroom`` of the device free (and fits the usable memory), with
    the cheapest recompute setting that allows a micro batch of at least 8 (else the largest overall)."""
    par, tr = cfg.parallel, cfg.train
    dp = par.world_size // par.model_parallel
    per_rank_batch = tr.global_batch_size // dp
    budget = min(usable_bytes(gpu_memory_gib), (1 - headroom) * gpu_memory_gib * GIB)
    best = None
    for name in ("none", "selective", "full"):
        c = with_recompute(cfg, RECOMPUTE_SETTINGS[name])
        ok = [mb for mb in range(1, per_rank_batch + 1) if per_rank_batch % mb == 0
              and per_rank(c, mb, device)["total_bytes"] <= budget]
        if ok and (best is None or max(ok) > best[0]):
            best = (max(ok), name)
        if ok and max(ok) >= 8:
            return max(ok), name
    return best or (0, "full")


# The Slurm templates' shapes (slurm/train_*.sh: nodes x 8 GPUs, TP, ZeRO as shipped); the micro batch and
# recompute setting are what :func:`size_template` chooses for 80 GB GPUs (tests/test_plan_templates.py
# fails when a template or the README drifts from it).
TEMPLATE_SHAPES = {"B": (2, 1, 1), "L": (4, 1, 1), "XL": (8, 2, 2), "H": (16, 2, 2)}


def _load(preset, world, tp, zero, extra=()):
    from heptapod_ds.config.loader import load_config

    return load_config(overrides=[f"preset={preset}", f"parallel.tensor={tp}", f"parallel.zero_stage={zero}",
                                  "parallel.gpu_memory_gib=0", *extra], world_size=world)


def template_defaults(gpu_memory_gib: float = 80.0) -> Dict[str, Dict[str, Any]]:
    """{preset: {nodes, tp, zero, micro_batch, recompute, dp, grad_accum}} as the planner sizes the templates."""
    out = {}
    for preset, (nodes, tp, zero) in TEMPLATE_SHAPES.items():
        world = nodes * 8
        mb, rc = size_template(_load(preset, world, tp, zero, ["train.micro_batch_size=1"]), gpu_memory_gib)
        cfg = _load(preset, world, tp, zero, [f"train.micro_batch_size={mb}"])
        dp = world // tp
        out[preset] = {"nodes": nodes, "tp": tp, "zero": zero, "micro_batch": mb, "recompute": rc, "dp": dp,
                       "grad_accum": cfg.train.global_batch_size // (mb * dp)}
    return out


def fit_table() -> str:
    """The README's "Will it fit?" table: every ImageNet preset, template layout sized by the planner, on
    8 x 80 GB and on 16 nodes x 8 H200 (141 GB)."""
    rows = ["| preset | GPUs | TP | ZeRO | micro batch | recompute | GiB per rank | fits | step (s) | images/s | "
            "days (800 ep) | FID-50K GPU-h |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for world, gib, label in ((8, 80.0, "8 x 80 GB"), (128, 141.0, "16 x 8 H200")):
        for preset, (_, tp, zero) in TEMPLATE_SHAPES.items():
            mb, rc = size_template(_load(preset, world, tp, zero, ["train.micro_batch_size=1"]), gib)
            cfg = _load(preset, world, tp, zero, [f"train.micro_batch_size={mb}", f"recompute.granularity={rc}"])
            p = make_plan(cfg, gpu_memory_gib=gib)
            rows.append(f"| {preset} | {label} | {tp} | {zero} | {mb} | {rc} | "
                        f"{p['per_rank']['total_bytes'] / GIB:.1f} | {'yes' if p['fits'] else 'no'} | "
                        f"{p['step_time_s']:.2f} | {p['images_per_s']:.0f} | {p['days']:.1f} | "
                        f"{p['fid50k_gpu_hours']:.1f} |")
    return "\n".join(rows)
