"""The bf16 path on CPU: DeepSpeed's bf16 optimizers under ZeRO-1 and ZeRO-3 (2 ranks), exact resume,
the EMA following the fp32 master (not the bf16 module copy), EMA swap and the checkpoint round trip."""
import numpy as np
import pytest
import torch

from dist_harness import run_ranks

pytestmark = pytest.mark.slow

BASE = ["train.global_batch_size=8", "train.micro_batch_size=4", "optimizer.lr=0.01", "schedule.warmup_steps=2",
        "train.ema_decay=0.9", "optimizer.grad_clip=0.5", "parallel.precision=bf16"]


def _master_ema_body(rank, world_size, tmp, stage):
    """Train 6 steps keeping, beside the EMA, a reference EMA of the full fp32 master (gathered each step)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from engine_standin import StandIn, local_micro_batches, loss_fn
    from heptapod_ds.config import load_config
    from heptapod_ds.distributed import get_info, initialize
    from heptapod_ds.engine import EMA, NonFiniteGuard, build_engine, train_step

    cfg = load_config(overrides=BASE + [f"parallel.zero_stage={stage}", f"run_dir={tmp}/m{stage}"],
                      world_size=world_size)
    initialize(1, 1, seed=0)
    info = get_info()
    engine, _, _ = build_engine(cfg, lambda: StandIn())
    ema, ema_module = EMA(engine, 0.9), EMA(engine, 0.9, follow="module")
    named = list(engine.module.named_parameters())
    def full_master(p):
        full = safe_get_full_fp32_param(p)
        if full is None:  # bf16 ZeRO-0: DeepSpeed's FP16_UnfusedOptimizer keeps full fp32 copies by position
            opt = engine.optimizer
            full = next(hp for lows, highs in zip(opt.fp16_groups, opt.fp32_groups)
                        for lp, hp in zip(lows, highs) if lp is p)
        return full

    ref = {n: full_master(p).clone() for n, p in named}
    dtypes = {p.dtype for _, p in named}
    nf = NonFiniteGuard(3)
    for step in range(6):
        d = ema.current_decay()
        train_step(engine, local_micro_batches(step, 8, info.dp_rank, info.dp_size, 1), loss_fn, nf, None)
        ema.update()
        ema_module.update()
        for n, p in named:
            ref[n].lerp_(full_master(p).float(), 1 - d)
    ema.sync()
    ema_module.sync()
    out = {"dtypes": sorted(str(t) for t in dtypes), "err_master": 0.0, "err_module": 0.0}
    for (n, p), shadow, shadow_mod in zip(named, ema.shadow, ema_module.shadow):
        want = ref[n].flatten()
        if hasattr(p, "ds_tensor"):  # this rank's ZeRO-3 partition (padded at the end)
            part = p.ds_tensor.numel()
            want = torch.nn.functional.pad(want, (0, part * world_size - want.numel()))[rank * part:(rank + 1) * part]
        out["err_master"] = max(out["err_master"], float((shadow.flatten() - want).abs().max()))
        out["err_module"] = max(out["err_module"], float((shadow_mod.flatten() - want).abs().max()))
    # swap: the module holds the EMA (rounded to bf16) inside, its own weights bit-exactly after
    before = {n: p.detach().clone() for n, p in named if not hasattr(p, "ds_tensor")}
    with ema.swap(engine):
        inside = {n: p.detach().clone() for n, p in named if not hasattr(p, "ds_tensor")}
    after = {n: p.detach().clone() for n, p in named if not hasattr(p, "ds_tensor")}
    out["swap_restores"] = all(torch.equal(before[n], after[n]) for n in before)
    out["swap_shows_ema"] = all(torch.equal(inside[n], s.view_as(inside[n]).to(inside[n].dtype))
                                for (n, _), s in zip(named, ema.shadow) if n in inside)
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=stage == 3):
        out["module_dtype"] = str(named[0][1].dtype)
    return out


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_bf16_ema_follows_the_fp32_master_and_swaps_exactly(tmp_path, stage):
    out = run_ranks(_master_ema_body, 2, args=(str(tmp_path), stage), timeout=600)
    for r in out:
        assert r["dtypes"] == ["torch.bfloat16"] and r["module_dtype"] == "torch.bfloat16"
        assert r["err_master"] < 1e-6, r          # the EMA of the fp32 master, to fp32 round-off
        assert r["err_module"] > 100 * max(r["err_master"], 1e-9), r  # the bf16 copy is measurably off
        assert r["swap_restores"] and (stage == 3 or r["swap_shows_ema"])


def _resume_body(rank, world_size, tmp, stage):
    from engine_standin import run_training

    cfg = BASE + [f"parallel.zero_stage={stage}", "checkpoint.save_every=0"]
    full = run_training(cfg + [f"run_dir={tmp}/full{stage}", "checkpoint.resume=none"], 6)
    first = run_training(cfg + [f"run_dir={tmp}/split{stage}"], 6, signal_rank_at=(1, 3))
    second = run_training(cfg + [f"run_dir={tmp}/split{stage}"], 6)
    return full, first, second


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_preempt_and_resume_is_exact(tmp_path, stage):
    from heptapod_ds.engine.integrity import verify_checkpoint

    out = run_ranks(_resume_body, 2, args=(str(tmp_path), stage), timeout=900)
    for rank, (full, first, second) in enumerate(out):
        assert first["step"] == 3  # both ranks stop after step 3; the signal reached rank 1 only
        assert first["stopped_by"] == ("SIGUSR1" if rank == 1 else None)
        assert second["losses"] == full["losses"]
        for name in full["params"]:
            assert np.array_equal(second["params"][name], full["params"][name]), name
            assert np.array_equal(second["ema"][name], full["ema"][name]), name
    assert verify_checkpoint(tmp_path / f"split{stage}" / "checkpoints" / "global_step3", strict=True) == []
