"""Acceptance of tools/convert_ckpt.py on real training runs (tiny Heptapod, gloo, 4 + 2 ranks).

One 4-rank world trains the reference (TP=2 x DP=2, ZeRO-3, 6 steps, checkpoints at 3 and 6), converts
its step-3 checkpoint (rank 0), loads every resharded layout (ZeRO-0/1/2/3 x TP 1/2, and PP=2) and the
from-release checkpoints (TP=2 ZeRO-3, PP=2) into DeepSpeed engines and saves them again with DeepSpeed,
resumes the DP=4 ZeRO-0 / ZeRO-2 / ZeRO-3, the TP=2 x DP=2 ZeRO-1 and the PP=2 x DP=2 reshards to step 6 (the
PP=2 run saving every step), reshards
the PP=2 run's own step-4 checkpoint back to PP=1, and samples from the training checkpoint and from the
release. A 2-rank world resumes the TP=1 x DP=2 ZeRO-1 reshard of step 3 and the PP=1 reshard of the PP=2
step 4. The assertions then share these runs.
"""
import inspect
import json
import os

import pytest
import torch

from dist_harness import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # one shared fixture runs every world

SMALL = ["backbone.depth=2", "backbone.width=32", "backbone.num_heads=2", "head.depth=1", "head.width=32",
         "head.num_heads=2", "head.timesteps=2", "head.supervised=4", "train.global_batch_size=16",
         "train.micro_batch_size=8", "train.grad_accum=0", "train.ema_decay=0.9", "optimizer.lr=3e-3",
         "schedule.warmup_steps=2", "data.num_workers=1", "logging.log_every=1", "logging.progress_bar=false",
         "checkpoint.save_every=3", "checkpoint.keep_last=3", "sampling.eval_per_class=0", "train.steps=6"]
LAYOUTS = [(tp, z) for tp in (1, 2) for z in (0, 1, 2, 3)]


def _cfg(world, *extra):
    from heptapod_ds.config import load_config
    return load_config(overrides=[*SMALL, *extra], world_size=world)


def _relayout(tp, pp=1):
    """New megatron groups for another TP / PP size on the same processes (the gloo world stays)."""
    from heptapod_ds.distributed import parallel_state

    if parallel_state.is_initialized():
        parallel_state._OWNS_PROCESS_GROUP = False
        parallel_state.destroy()
    parallel_state.initialize(tensor=tp, pipeline=pp, backend="gloo", seed=0)


def _train(cfg):
    from heptapod_ds.training import Trainer

    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.run() == 0


def _convert(argv):
    from heptapod_ds.checkpoint.cli import main
    code = main(argv)
    assert code == 0, f"convert_ckpt {' '.join(argv)} exited {code}"


def _generate(model, labels, seed):
    if "seeds" in inspect.signature(model.generate).parameters:  # issue 10: per-image seeds
        return model.generate(labels, seeds=torch.arange(len(labels)) + seed)
    return model.generate(labels, seed=seed)


def _engine(cfg):
    from heptapod_ds.engine import EMA, CheckpointManager, build_engine
    from heptapod_ds.model import build_model

    engine, _, _ = build_engine(cfg, lambda: build_model(cfg))
    ema = EMA(engine, cfg.train.ema_decay)
    return engine, ema, CheckpointManager(cfg)


def _on_rank0(rank, commands):
    """Run converter commands on rank 0; every rank fails if one does."""
    import torch.distributed as dist

    error = [None]
    if rank == 0:
        try:
            for argv in commands:
                _convert(argv)
        except BaseException as e:  # noqa: BLE001 - tell the other ranks, then fail
            error[0] = repr(e)
    dist.broadcast_object_list(error, src=0)
    assert error[0] is None, f"conversion on rank 0 failed: {error[0]}"


PP2 = ["parallel.pipeline=2", "parallel.zero_stage=1", "train.micro_batch_size=4"]  # 2 micro-batches per step
RESUMED = [("L10", 1, 0), ("L13", 1, 3), ("L21", 2, 1)]  # reshards of step 3 that are also trained to step 6


def _world4(rank, world_size, tmp):
    from heptapod_ds.checkpoint import build_model_from_release

    _relayout(2)
    _train(_cfg(4, "parallel.tensor=2", "parallel.zero_stage=3", f"run_dir={tmp}/ref"))
    step3 = f"{tmp}/ref/checkpoints/global_step3"
    _on_rank0(rank, [
        ["reshard", "--ckpt", step3, "--out", f"{tmp}/A", "--tensor", "1", "--dp", "2", "--zero", "1"],
        ["reshard", "--ckpt", step3, "--out", f"{tmp}/B", "--tensor", "1", "--dp", "4", "--zero", "2"],
        ["reshard", "--ckpt", step3, "--out", f"{tmp}/P", "--tensor", "1", "--pipeline", "2", "--dp", "2",
         "--zero", "1"],
        *[["reshard", "--ckpt", step3, "--out", f"{tmp}/L{tp}{z}", "--tensor", str(tp), "--dp", str(4 // tp),
           "--zero", str(z)] for tp, z in LAYOUTS],
        ["to-release", "--ckpt", step3, "--out", f"{tmp}/rel_raw", "--weights", "raw"],
        ["to-release", "--ckpt", step3, "--out", f"{tmp}/rel_ema", "--weights", "ema"],
        ["from-release", "--release", f"{tmp}/rel_raw", "--out", f"{tmp}/FR", "--tensor", "2", "--dp", "2",
         "--zero", "3"],
        ["from-release", "--release", f"{tmp}/rel_raw", "--out", f"{tmp}/FRP", "--tensor", "1", "--pipeline",
         "2", "--dp", "2", "--zero", "1"]])

    # every written layout loads in DeepSpeed and is saved again by it (PP=2: one engine per stage)
    from heptapod_ds.engine import CheckpointManager
    for name, tp, z, pp in ([(f"L{tp}{z}", tp, z, 1) for tp, z in LAYOUTS]
                            + [("FR", 2, 3, 1), ("P", 1, 1, 2), ("FRP", 1, 1, 2)]):
        _relayout(tp, pp)
        layout = PP2 if pp == 2 else [f"parallel.tensor={tp}", f"parallel.zero_stage={z}",
                                      f"train.micro_batch_size={8 if tp == 2 else 4}"]
        engine, ema, ckpt = _engine(_cfg(4, *layout, f"run_dir={tmp}/{name}"))
        state = ckpt.load(engine, ema=ema)
        assert state is not None, f"{name}: nothing resumed"
        out = CheckpointManager(_cfg(4, *layout, f"run_dir={tmp}/{name}_ds"))
        out.save(engine, int(state["step"]), state, ema=ema)
        del engine

    # resume the DP=4 ZeRO-2 reshard to step 6, and the ZeRO-0, ZeRO-3 (DP=4) and TP=2 ZeRO-1 (DP=2) ones
    _relayout(1)
    _train(_cfg(4, "parallel.zero_stage=2", "train.micro_batch_size=4", f"run_dir={tmp}/B"))
    for name, tp, z in RESUMED:
        _relayout(tp)
        _train(_cfg(4, f"parallel.tensor={tp}", f"parallel.zero_stage={z}", f"train.micro_batch_size={8 if tp == 2 else 4}",
                    f"run_dir={tmp}/{name}"))
    # resume the PP=2 reshard to step 6, saving every step; its own step 4 goes back to PP=1 (_world2)
    _relayout(1, 2)
    _train(_cfg(4, *PP2, "checkpoint.save_every=1", f"run_dir={tmp}/P"))
    _on_rank0(rank, [["reshard", "--ckpt", f"{tmp}/P/checkpoints/global_step4", "--out", f"{tmp}/Q",
                      "--tensor", "1", "--dp", "2", "--zero", "1"]])

    # train.py starts from a release in another layout (TP=2 ZeRO-3 partitions filled from full tensors)
    _relayout(2)
    _train(_cfg(4, "parallel.tensor=2", "parallel.zero_stage=3", "train.steps=0", f"run_dir={tmp}/init",
                f"checkpoint.from_release={tmp}/rel_raw"))

    # sampling: the training checkpoint as DeepSpeed loads it (ZeRO-3, TP=2, EMA swapped in) against the
    # release rebuilt from its config.json. DeepSpeed's weights are gathered (DP and TP) into a plain TP=1
    # model and both sample at TP=1: 64 steps of TP collectives (or ZeRO-3's per-module hooks) on four
    # processes over two busy cores cost a minute, and test nothing the release does not.
    import deepspeed

    from heptapod_ds.model import build_model
    from heptapod_ds.model.tp_shard import gather_full_state_dict

    _relayout(2)
    cfg = _cfg(4, "parallel.tensor=2", "parallel.zero_stage=3", f"run_dir={tmp}/ref", f"checkpoint.resume={step3}")
    engine, ema, ckpt = _engine(cfg)
    ckpt.load(engine, ema=ema)
    with ema.swap(engine), deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        loaded = gather_full_state_dict(engine.module)
    del engine
    _relayout(1)
    model = build_model(_cfg(4, "train.micro_batch_size=4", f"run_dir={tmp}/ref"))
    params = {n for n, _ in model.named_parameters()}
    assert params <= set(loaded), sorted(params - set(loaded))[:3]
    model.load_state_dict({k: v for k, v in loaded.items() if k in params}, strict=False)
    labels = torch.tensor([3, 7])
    from_ckpt = _generate(model.eval(), labels, seed=5)
    release_model = build_model_from_release(f"{tmp}/rel_ema")
    from_release = _generate(release_model, labels, seed=5)
    return {"from_ckpt": from_ckpt, "from_release": from_release}


def _world2(rank, world_size, tmp):
    _relayout(1)
    _train(_cfg(2, "parallel.zero_stage=1", f"run_dir={tmp}/A"))
    _train(_cfg(2, "parallel.zero_stage=1", f"run_dir={tmp}/Q"))
    return True


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _release(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def _assert_identical(a, b, what):
    assert a.keys() == b.keys(), f"{what}: names differ"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: '{k}' differs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    w4 = run_ranks(_world4, 4, args=(str(tmp),), timeout=900)
    run_ranks(_world2, 2, args=(str(tmp),), timeout=400)
    return tmp, w4


def test_resume_on_another_shape_matches_the_uninterrupted_run(runs):
    tmp, _ = runs
    ref = _losses(tmp / "ref")
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    # A: TP=1 DP=2 ZeRO-1, B: DP=4 ZeRO-2, P: PP=2 x DP=2 (from PP=1), Q: PP=1 from P's own PP=2 step 4;
    # L10 / L13: DP=4 ZeRO-0 / ZeRO-3, L21: TP=2 x DP=2 ZeRO-1 (the source is TP=2 x DP=2 ZeRO-3)
    for name, steps in (("A", [4, 5, 6]), ("B", [4, 5, 6]), ("P", [4, 5, 6]), ("Q", [5, 6]),
                        *((name, [4, 5, 6]) for name, _, _ in RESUMED)):
        got = _losses(tmp / name)
        assert sorted(got) == steps, f"{name} did not resume at step {steps[0] - 1}: {sorted(got)}"
        for s in steps:
            assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), f"{name} step {s}: {got[s]} vs {ref[s]}"


def test_to_release_is_identical_for_every_layout_saved_by_deepspeed(runs, single_rank):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from heptapod_ds.checkpoint.cli import main

    tmp, _ = runs
    raw, ema = _release(tmp / "rel_raw"), _release(tmp / "rel_ema")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the EMA really is another tensor set
    for tp, z in LAYOUTS:
        src = tmp / f"L{tp}{z}_ds"
        meta = json.loads((src / "checkpoints" / "global_step3" / "heptapod_meta.json").read_text())
        assert {k: meta["layout"][k] for k in ("tensor", "pipeline", "dp", "zero_stage")} == \
            {"tensor": tp, "pipeline": 1, "dp": 4 // tp, "zero_stage": z}
        for weights, expect in (("raw", raw), ("ema", ema)):
            out = tmp / f"rel_{tp}{z}_{weights}"
            assert main(["to-release", "--ckpt", str(src), "--out", str(out), "--weights", weights]) == 0
            _assert_identical(_release(out), expect, f"TP={tp} ZeRO-{z} {weights}")
        if tp == 1 and z > 0:  # DeepSpeed's own consolidation (it refuses TP > 1)
            ds = get_fp32_state_dict_from_zero_checkpoint(str(src / "checkpoints"), tag="global_step3")
            _assert_identical({k: v.float().contiguous() for k, v in ds.items()}, raw,
                              f"get_fp32_state_dict_from_zero_checkpoint TP=1 ZeRO-{z}")


def test_release_round_trip_through_tp2_zero3_and_pp2(runs, single_rank):
    from heptapod_ds.checkpoint.cli import main

    tmp, _ = runs
    for name, what in (("FR", "TP2 ZeRO-3"), ("FRP", "PP2 ZeRO-1")):
        out = tmp / f"rel_{name}"
        assert main(["to-release", "--ckpt", str(tmp / f"{name}_ds"), "--out", str(out), "--weights",
                     "raw"]) == 0
        _assert_identical(_release(out), _release(tmp / "rel_raw"), f"release -> from-release {what} -> "
                                                                    f"release")


def test_pp2_checkpoint_releases_the_same_tensors_as_pp1(runs, single_rank):
    """P_ds: the PP=2 reshard of the PP=1 step 3, loaded and saved again by the stages' DeepSpeed engines;
    P/global_step4: written by the PP=2 trainer itself, against its PP=1 reshard Q (resumed in _world2)."""
    from heptapod_ds.checkpoint.cli import main

    tmp, _ = runs
    tag = tmp / "P_ds" / "checkpoints" / "global_step3"
    assert sorted(p.name for p in tag.iterdir() if p.is_dir()) == ["pp_stage00", "pp_stage01"]
    for weights in ("raw", "ema"):
        out = tmp / f"rel_P_{weights}"
        assert main(["to-release", "--ckpt", str(tag), "--out", str(out), "--weights", weights]) == 0
        _assert_identical(_release(out), _release(tmp / f"rel_{weights}"), f"PP=2 vs PP=1 ({weights})")
    for ckpt, out in ((tmp / "P" / "checkpoints" / "global_step4", "rel_P4"),
                      (tmp / "Q" / "checkpoints" / "global_step4", "rel_Q4")):
        assert main(["to-release", "--ckpt", str(ckpt), "--out", str(tmp / out), "--weights", "raw"]) == 0
    _assert_identical(_release(tmp / "rel_P4"), _release(tmp / "rel_Q4"), "PP=2 step 4 vs its PP=1 reshard")


def test_train_py_starts_from_a_release(runs, single_rank):
    from heptapod_ds.checkpoint.cli import main

    tmp, _ = runs
    for weights in ("raw", "ema"):  # the EMA starts at the release's weights too
        out = tmp / f"rel_init_{weights}"
        assert main(["to-release", "--ckpt", str(tmp / "init"), "--out", str(out), "--weights", weights]) == 0
        _assert_identical(_release(out), _release(tmp / "rel_raw"), f"from_release -> step 0 ({weights})")


def test_sampling_from_release_equals_sampling_from_checkpoint(runs):
    _, w4 = runs
    for r in w4:
        assert torch.equal(r["from_ckpt"], r["from_release"])
