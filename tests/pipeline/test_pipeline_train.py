"""Pipeline parallelism computes what PP = 1 computes: losses and all parameters after 4 optimizer steps,
for every head x token kind and a cut inside the backbone and inside the head; the same in bf16 with ZeRO-0,
ZeRO-1 and ZeRO-2 (discrete tokens) and ZeRO-1 with continuous tokens; TP=2 x PP=2 (ZeRO-1) and PP=2 x DP=2 (ZeRO-2) on 4 ranks; a non-finite loss on the last stage
only skips the step everywhere (also through the coalesced ZeRO-1 / ZeRO-2 reduction of the 4-rank layouts, whose
gradient norms equal PP=1's); a bf16 ZeRO-1 PP=2 run stopped by SIGTERM after step 3 of 8 resumes exactly.

Few process launches (CI time): one 1-rank launch makes every reference, one 2-rank launch runs all the
PP=2 variants, one 4-rank launch both 4-rank layouts.
"""
import pytest
import torch

from dist_harness import run_ranks
from param_checks import assert_params_close
from pipeline_helpers import (HEAD_TYPES, TOKEN_KINDS, layout, max_relative_difference, merge_ranks,
                              small_overrides, strip, train, train_resumable)

pytestmark = pytest.mark.slow

STEPS = 4
BATCH = ["train.global_batch_size=8", "train.micro_batch_size=2", "checkpoint.resume=none"]
VARIANTS = [(kind, head) for kind in TOKEN_KINDS for head in HEAD_TYPES]
# (inside the backbone, inside the head); the `next` head has no head layers: its second cut puts the
# per-token output alone on the last stage
SPLITS = {"global": ("1,5", "4,2"), "local": ("1,5", "4,2"), "next": ("1,2", "3,0")}
POISONED = ("discrete", "global")
# bf16 (what every GPU run uses): DeepSpeed makes FP16_UnfusedOptimizer (fp32 master, bf16 gradients) for
# ZeRO-0 and DeepSpeedZeroOptimizer for ZeRO-1; "1-fp32acc": a JSON asking for fp32 gradient accumulation
# gives DeepSpeed's BF16_Optimizer (with the immediate_grad_update hooks that PP needs). The cut inside the
# head sends a bf16 head-shaped activation. The BF16_Optimizer run also gets a NaN loss on the last stage at
# (step 1, micro-batch 1), after its hooks moved earlier micro-batches' gradients into the fp32 buffers.
BF16 = {"variant": ("discrete", "global"), "split": "4,2", "zero": ("0", "1", "1-fp32acc", "2", "1-continuous"),
        "poison": {"1-fp32acc": (1, 1)}, "variants": {"1-continuous": ("continuous", "global")}}
RESUME = ["parallel.precision=bf16", "parallel.zero_stage=1", "parallel.pipeline=2", "train.ema_decay=0.9",
          "checkpoint.save_every=0", "train.global_batch_size=8", "train.micro_batch_size=2", "train.grad_accum=4"]
FOUR_RANKS = {"tp2_pp2_zero1": (("continuous", "global"), ["parallel.tensor=2", "parallel.pipeline=2",
                                                            "parallel.zero_stage=1", "train.grad_accum=4"]),
              "pp2_dp2_zero2": (("discrete", "local"), ["parallel.pipeline=2", "parallel.zero_stage=2",
                                                         "train.grad_accum=2"])}
# a NaN loss on the last stage only, inside the coalesced ZeRO-1 / ZeRO-2 reduction: the step is skipped
# everywhere (at PP=1 the same micro-batch is poisoned)
FOUR_RANK_POISON = {"tp2_pp2_zero1": (2, 3), "pp2_dp2_zero2": (1, 1)}


def _bf16_overrides(zero, tmp):
    """``zero``: "0", "1", "2" (DeepSpeed's defaults; "1-continuous": ZeRO-1 with continuous tokens) or
    "1-fp32acc" (a JSON selecting BF16_Optimizer)."""
    import json
    import os

    out = ["parallel.precision=bf16", f"parallel.zero_stage={zero[0]}"]
    if zero == "1-fp32acc":
        path = os.path.join(tmp, "zero1_fp32acc.json")
        with open(path, "w") as fh:
            json.dump({"zero_optimization": {"stage": "auto"}, "data_types": {"grad_accum_dtype": "fp32"},
                       "bf16": {"enabled": "auto", "immediate_grad_update": True}}, fh)
        out.append(f"parallel.ds_config={path}")
    return out


def _references(rank, world_size, tmp):
    layout(1, 1)
    out = {}
    for kind, head in VARIANTS:
        out[(kind, head)] = strip(train(small_overrides(kind, head) + BATCH + ["train.grad_accum=4",
                                                                              f"run_dir={tmp}/r"], STEPS))
    out["poisoned"] = strip(train(small_overrides(*POISONED) + BATCH + ["train.grad_accum=4", f"run_dir={tmp}/p"],
                                  STEPS, poison=(1, 1)))
    for zero in BF16["zero"]:
        variant = BF16["variants"].get(zero, BF16["variant"])
        out[("bf16", zero)] = strip(train(small_overrides(*variant) + BATCH + _bf16_overrides(zero, tmp) + [
            "train.grad_accum=4", f"run_dir={tmp}/b{zero}"], STEPS, poison=BF16["poison"].get(zero)))
    for name, ((kind, head), extra) in FOUR_RANKS.items():
        zero = [e for e in extra if e.startswith("parallel.zero_stage")]
        out[name] = strip(train(small_overrides(kind, head) + BATCH + zero + ["train.grad_accum=4",
                                                                             f"run_dir={tmp}/{name}"], STEPS,
                                poison=FOUR_RANK_POISON[name]))
    return out


def _pp2(rank, world_size, tmp):
    layout(1, 2)
    out = {}
    for kind, head in VARIANTS:
        for split in SPLITS[head]:
            cfg = small_overrides(kind, head) + BATCH + ["train.grad_accum=4", "parallel.pipeline=2",
                                                         f"parallel.pipeline_split={split}", "parallel.zero_stage=1",
                                                         f"run_dir={tmp}/pp"]
            out[(kind, head, split)] = strip(train(cfg, STEPS))
    cfg = small_overrides(*POISONED) + BATCH + ["train.grad_accum=4", "parallel.pipeline=2", "parallel.zero_stage=0",
                                                f"run_dir={tmp}/poison"]
    out["poisoned"] = strip(train(cfg, STEPS, poison=(1, 1)))
    for zero in BF16["zero"]:
        variant = BF16["variants"].get(zero, BF16["variant"])
        cfg = small_overrides(*variant) + BATCH + ["train.grad_accum=4", "parallel.pipeline=2",
                                                   f"parallel.pipeline_split={BF16['split']}",
                                                   f"run_dir={tmp}/bf16_{zero}"] + _bf16_overrides(zero, tmp)
        out[("bf16", zero)] = strip(train(cfg, STEPS, poison=BF16["poison"].get(zero)))
    # exact resume in bf16: uninterrupted 8 steps; SIGTERM on the last stage only after step 3; resume=auto
    resume = small_overrides("discrete", "local") + RESUME  # continuous tokens cannot run in bf16 yet (fp32 latents)
    out["resume"] = (train_resumable(resume + [f"run_dir={tmp}/full", "checkpoint.resume=none"], 8),
                     train_resumable(resume + [f"run_dir={tmp}/cut"], 8, sigterm_rank_after=(1, 3)),
                     train_resumable(resume + [f"run_dir={tmp}/cut"], 8))
    return out


def _four_ranks(rank, world_size, tmp):
    out = {}
    for name, ((kind, head), extra) in FOUR_RANKS.items():
        tp = 2 if "parallel.tensor=2" in extra else 1
        layout(tp, 2)
        out[name] = strip(train(small_overrides(kind, head) + BATCH + extra + [f"run_dir={tmp}/{name}"], STEPS,
                                poison=FOUR_RANK_POISON[name]))
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return run_ranks(_references, 1, args=(str(tmp_path_factory.mktemp("ref")),), timeout=600)[0]


def _check_same_run(runs, ref, what, skipped=()):
    """Every rank logged the reference's losses and gradient norms (TP-replicated parameters counted once);
    the ``skipped`` steps were skipped everywhere; the joined parameters match before and after."""
    assert ref["skipped"] == len(skipped) and all(r["skipped"] == len(skipped) for r in runs), what
    for r in runs:
        for step in range(STEPS):
            a, b = r["losses"][step], ref["losses"][step]
            if step in skipped:
                assert a != a and b != b and r["norms"][step] is None, f"{what}: step {step} not skipped"
                continue
            assert abs(a - b) <= 1e-5 * abs(b), f"{what}: step {step} loss {a} vs {b} (PP=1)"
            a, b = r["norms"][step], ref["norms"][step]
            assert abs(a - b) <= 1e-4 * b, f"{what}: step {step} grad norm {a} vs {b} (PP=1)"
    initial = merge_ranks([{**r, "params": r["initial"]} for r in runs])
    err, name = max_relative_difference(initial, ref["initial"])
    assert err == 0.0, f"{what}: initial weights differ from PP=1 ({name}: {err:.2e})"
    assert_params_close(merge_ranks(runs), ref["params"], what)
    # the run trained: the parameters moved
    moved, _ = max_relative_difference(ref["params"], ref["initial"])
    assert moved > 1e-3


@pytest.fixture(scope="module")
def pp2_runs(tmp_path_factory):
    return run_ranks(_pp2, 2, args=(str(tmp_path_factory.mktemp("pp2")),), timeout=900)


def test_pp2_matches_pp1_for_every_head_token_kind_and_cut(references, pp2_runs):
    runs = pp2_runs
    for kind, head in VARIANTS:
        for split in SPLITS[head]:
            _check_same_run([r[(kind, head, split)] for r in runs], references[(kind, head)],
                            f"{kind}/{head} split {split}")
            norms = [r[(kind, head, split)]["norms"] for r in runs]
            assert norms[0] == norms[1]  # one global norm, the same on both stages
            ref_norms = references[(kind, head)]["norms"]
            assert all(abs(norms[0][s] - ref_norms[s]) <= 1e-4 * ref_norms[s] for s in range(STEPS))
    # a NaN injected on the last stage only: the step is skipped on both stages, as at PP=1
    poisoned = [r["poisoned"] for r in runs]
    assert [r["skipped"] for r in poisoned] == [1, 1] and references["poisoned"]["skipped"] == 1
    assert all(r["losses"][1] != r["losses"][1] for r in poisoned)  # NaN logged for the skipped step
    for step in (0, 2, 3):
        for r in poisoned:
            assert abs(r["losses"][step] - references["poisoned"]["losses"][step]) <= 1e-5 * abs(
                references["poisoned"]["losses"][step])
    assert_params_close(merge_ranks(poisoned), references["poisoned"]["params"], "after a skipped step")


def test_four_rank_layouts_match_one_rank(references, tmp_path):
    runs = run_ranks(_four_ranks, 4, args=(str(tmp_path),), timeout=900)
    for name in FOUR_RANKS:
        _check_same_run([r[name] for r in runs], references[name], name, skipped=(FOUR_RANK_POISON[name][0],))


def _update(params, initial):
    """The whole model's change over the run as one fp32 vector."""
    import torch

    return torch.cat([(params[k].float() - initial[k].float()).flatten() for k in sorted(params)])


@pytest.mark.parametrize("zero", BF16["zero"])
def test_bf16_pp2_matches_pp1(references, pp2_runs, zero):
    """bf16 keeps 8 significant bits (a relative spacing of 2**-8 = 0.4%). PP changes no operation of the
    forward or backward, but the fp32 gradient norm (hence the clipping factor) is summed in another order;
    where the bf16 weights are rounded from an fp32 master, a 1e-7 difference there can flip single roundings
    by one ulp, and Adam carries that on. Measured after 4 steps (logged losses equal everywhere):
    ZeRO-0 weights bit-identical (norms 5e-8 apart); ZeRO-1 with bf16 gradients: norms 4.5e-5 apart, the
    model's update 0.57%, no weight more than one ulp off; BF16_Optimizer (fp32 accumulation): norms 1e-7,
    update 1e-9. The bounds below allow about 5x the worst; a wrong reduction (a micro-batch lost or counted
    twice, a missing DP or stage reduction) moves the grad norm or the update by tens of percent."""
    ref = references[("bf16", zero)]
    runs = [r[("bf16", zero)] for r in pp2_runs]
    what = f"bf16 ZeRO-{zero}"
    poisoned = BF16["poison"].get(zero)
    skipped = [] if poisoned is None else [poisoned[0]]
    assert ref["skipped"] == len(skipped) and all(r["skipped"] == len(skipped) for r in runs)
    for r in runs:
        assert r["norms"] == runs[0]["norms"]  # one global norm on both stages
        assert all(r["losses"][s] != r["losses"][s] and r["norms"][s] is None for s in skipped)
        for step in (s for s in range(STEPS) if s not in skipped):
            a, b = r["losses"][step], ref["losses"][step]
            assert abs(a - b) <= 2 ** -7 * abs(b), f"{what}: step {step} loss {a} vs {b} (PP=1)"
            a, b = r["norms"][step], ref["norms"][step]
            assert abs(a - b) <= 2.5e-4 * b, f"{what}: step {step} grad norm {a} vs {b} (PP=1)"
    initial, params = merge_ranks([{**r, "params": r["initial"]} for r in runs]), merge_ranks(runs)
    assert {str(v.dtype) for v in params.values()} == {"torch.bfloat16"}
    err, name = max_relative_difference(initial, ref["initial"])
    assert err == 0.0, f"{what}: initial weights differ from PP=1 ({name}: {err:.2e})"
    ours, theirs = _update(params, initial), _update(ref["params"], ref["initial"])
    assert float(theirs.norm()) > 1e-2  # the run trained
    rel = float((ours - theirs).norm() / theirs.norm())
    assert rel <= 0.03, f"{what}: the model's update differs from PP=1 by {rel:.3%}"
    ulp = 2.0 ** -7 * max(float(v.float().abs().max()) for v in ref["params"].values())
    worst = max(float((params[k].float() - ref["params"][k].float()).abs().max()) for k in params)
    assert worst <= 2 * ulp, f"{what}: a weight differs by {worst} (> two bf16 ulps of the largest, {2 * ulp})"


def test_bf16_pp2_resume_after_sigterm_is_exact(pp2_runs):
    for rank, r in enumerate(pp2_runs):
        full, first, second = r["resume"]
        assert first["step"] == 3 and first["stopped_by"] == ("SIGTERM" if rank == 1 else None)
        assert second["step"] == 8 and second["losses"] == full["losses"] and sorted(full["losses"]) == list(range(8))
        assert full["params"].keys() == second["params"].keys() and full["ema"].keys() == second["ema"].keys()
        for k in full["params"]:
            assert torch.equal(full["params"][k], second["params"][k]), f"stage {rank}: {k} differs after resume"
        for k in full["ema"]:
            assert torch.equal(full["ema"][k], second["ema"][k]), f"stage {rank}: EMA of {k} differs after resume"
    assert any(k.startswith("output.") for k in pp2_runs[1]["resume"][0]["params"])
