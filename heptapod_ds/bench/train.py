"""Training-step rows: the full stack (megatron layers + DeepSpeed ZeRO-0 / ZeRO-3, world 1) against the
plain-PyTorch reference of the same network, and achieved FLOP/s / MFU against a matmul peak.

All three step functions run round-robin in one loop on the same batch; ratios are per round.
The reference loads the full stack's initial weights and must give the same first loss (1e-5),
so it is provably the same network. EMA is off in both (the reference has none).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Dict, List

import torch

from .timing import interleave, ratio_summary, summary

log = logging.getLogger(__name__)


def matmul_peak(size: int, repeats: int) -> Dict[str, float]:
    """Best FLOP/s of an fp32 square matmul on this machine (the MFU denominator), measured now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    a @ b  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {"size": size, "flops_per_s": 2 * size ** 3 / best}


@contextlib.contextmanager
def _functional_linear(fn):
    saved = torch.nn.functional.linear
    torch.nn.functional.linear = fn
    try:
        yield
    finally:
        torch.nn.functional.linear = saved


def bench_config(preset: str, micro_batch: int, zero_stage: int, attention: str = "auto", compile: bool = False):
    from heptapod_ds.config import load_config

    return load_config(overrides=[f"preset={preset}", f"parallel.zero_stage={zero_stage}",
                                  f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch}",
                                  "train.grad_accum=1", "train.ema_decay=0", f"backbone.attention={attention}",
                                  "logging.wandb_mode=disabled", f"train.compile={str(compile).lower()}"],
                       world_size=1)


def _batch(cfg, micro_batch: int):
    g = torch.Generator().manual_seed(1234)
    tok = cfg.tokenizer
    if tok.is_discrete:
        tokens = torch.randint(0, tok.vocab_size, (micro_batch, tok.num_tokens), generator=g)
    else:
        tokens = torch.randn(micro_batch, tok.num_tokens, tok.channels, generator=g)
    labels = torch.randint(0, cfg.backbone.num_classes, (micro_batch,), generator=g)
    return tokens, labels, torch.arange(micro_batch) + 77


def run(preset: str, micro_batch: int, repeats: int, peak_size: int) -> List[Dict]:
    """Rows ``train/*`` and ``mfu/*``; call inside a 1-rank world (see :func:`__main__._single_rank`)."""
    from heptapod_ds.engine import NonFiniteGuard, build_engine, train_step
    from heptapod_ds.model import build_model
    from heptapod_ds.cost.flops import train_flops_per_image

    from .reference import plain_reference

    engines, first_losses = {}, {}
    plain_linear = torch.nn.functional.linear
    for stage in (0, 3):
        cfg = bench_config(preset, micro_batch, stage)
        engines[stage], _, _ = build_engine(cfg, lambda cfg=cfg: build_model(cfg))
    # zero.Init replaces torch.nn.functional.linear for the rest of the process (DeepSpeed's
    # memory_efficient_linear); each variant runs with what it would have in its own process.
    linear = {"reference": plain_linear, 0: plain_linear, 3: torch.nn.functional.linear, "compiled": plain_linear}
    torch.nn.functional.linear = plain_linear
    # ZeRO-0 with train.compile: its layers compile on its first training step, timed apart below
    cfg_compiled = bench_config(preset, micro_batch, 0, compile=True)
    engines["compiled"], _, _ = build_engine(cfg_compiled, lambda: build_model(cfg_compiled))
    cfg = bench_config(preset, micro_batch, 0)
    tokens, labels, seeds = _batch(cfg, micro_batch)
    ref = plain_reference(engines[0].module)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2),
                                eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay)
    with torch.no_grad():
        first_losses["reference"] = float(ref(tokens, labels, sample_seeds=seeds)[0])
        for stage, engine in engines.items():
            with _functional_linear(linear[stage]):
                first_losses[f"zero{stage}"] = float(engine(tokens, labels, sample_seeds=seeds)[0])
    first_losses["compiled"] = first_losses.pop("zerocompiled")  # without gradients: its eager layers
    for name in ("zero0", "zero3", "compiled"):
        diff = abs(first_losses[name] - first_losses["reference"])
        if diff > 1e-5 * max(1.0, abs(first_losses["reference"])):
            raise RuntimeError(f"plain reference is not the same network: first loss {first_losses['reference']:.7f} "
                               f"vs {name} {first_losses[name]:.7f}.")
    guards = {stage: NonFiniteGuard(5) for stage in engines}

    def full_step(stage):
        def step():
            with _functional_linear(linear[stage]):
                train_step(engines[stage], [(tokens, labels, seeds)],
                           lambda eng, mb: eng(mb[0], mb[1], sample_seeds=mb[2])[0], guards[stage])
        return step

    def ref_step():
        ref_opt.zero_grad(set_to_none=True)
        loss, _ = ref(tokens, labels, sample_seeds=seeds)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optimizer.grad_clip)
        ref_opt.step()

    compiled_step = full_step("compiled")
    import torch._inductor.config as inductor_config

    t0 = time.perf_counter()
    # Dynamo + Inductor compile here: the compile time, apart from the step times, with Inductor's on-disk caches
    # off (what a fresh machine pays: quick row measured 39.7 s cold, 3.8 s with the caches warm)
    with inductor_config.patch(force_disable_caches=True):
        compiled_step()
    compile_s = time.perf_counter() - t0
    log.info("training step: %s, micro batch %d, %d interleaved repeats (compile of train/%s/compiled: %.1f s)",
             preset, micro_batch, repeats, preset, compile_s)
    times = interleave({"reference": ref_step, "zero0": full_step(0), "zero3": full_step(3),
                        "compiled": compiled_step}, repeats, warmup=1)
    peak = matmul_peak(peak_size, max(3, repeats))
    flops = train_flops_per_image(cfg)
    rows = []
    for name in ("reference", "zero0", "zero3", "compiled"):
        s = summary(times[name])
        row = {"row": f"train/{preset}/{name}", "step_s": s, "images_per_s": micro_batch / s["median"],
               "first_loss": first_losses[name]}
        if name != "reference":
            row["ratio_to_reference"] = ratio_summary(times[name], times["reference"])
        if name == "compiled":  # the same ZeRO-0 stack with train.compile; its first step compiled
            row["compile_s"] = compile_s
            row["ratio_to_eager"] = ratio_summary(times[name], times["zero0"])
            # steps after which compiling has paid for itself: compile time over the time saved per step
            saved = summary(times["zero0"])["median"] - s["median"]
            row["break_even_steps"] = (compile_s - s["median"]) / saved if saved > 0 else None
        achieved = flops * micro_batch / s["median"]
        row["achieved_flops_per_s"] = achieved
        row["mfu"] = achieved / peak["flops_per_s"]
        rows.append(row)
    rows.append({"row": "mfu/matmul_peak", "peak_flops_per_s": peak["flops_per_s"], "matmul_size": peak_size,
                 "train_flops_per_image": flops, "threads": torch.get_num_threads()})
    for engine in engines.values():
        engine.destroy() if hasattr(engine, "destroy") else None
    return rows
