"""Pipeline parallelism computes what PP = 1 computes: losses and all parameters after 4 optimizer steps,
for every head x token kind and a cut inside the backbone and inside the head; TP=2 x PP=2 (ZeRO-1) and
PP=2 x DP=2 (ZeRO-2) on 4 ranks; a non-finite loss on the last stage only skips the step everywhere.

Few process launches (CI time): one 1-rank launch makes every reference, one 2-rank launch runs all the
PP=2 variants, one 4-rank launch both 4-rank layouts.
"""
import pytest

from dist_harness import run_ranks
from param_checks import assert_params_close
from pipeline_helpers import (HEAD_TYPES, TOKEN_KINDS, layout, max_relative_difference, merge_ranks,
                              small_overrides, strip, train)

pytestmark = pytest.mark.slow

STEPS = 4
BATCH = ["train.global_batch_size=8", "train.micro_batch_size=2", "checkpoint.resume=none"]
VARIANTS = [(kind, head) for kind in TOKEN_KINDS for head in HEAD_TYPES]
# (inside the backbone, inside the head); the `next` head has no head layers: its second cut puts the
# per-token output alone on the last stage
SPLITS = {"global": ("1,5", "4,2"), "local": ("1,5", "4,2"), "next": ("1,2", "3,0")}
POISONED = ("discrete", "global")
FOUR_RANKS = {"tp2_pp2_zero1": (("continuous", "global"), ["parallel.tensor=2", "parallel.pipeline=2",
                                                            "parallel.zero_stage=1", "train.grad_accum=4"]),
              "pp2_dp2_zero2": (("discrete", "local"), ["parallel.pipeline=2", "parallel.zero_stage=2",
                                                         "train.grad_accum=2"])}


def _references(rank, world_size, tmp):
    layout(1, 1)
    out = {}
    for kind, head in VARIANTS:
        out[(kind, head)] = strip(train(small_overrides(kind, head) + BATCH + ["train.grad_accum=4",
                                                                              f"run_dir={tmp}/r"], STEPS))
    out["poisoned"] = strip(train(small_overrides(*POISONED) + BATCH + ["train.grad_accum=4", f"run_dir={tmp}/p"],
                                  STEPS, poison=(1, 1)))
    for name, ((kind, head), extra) in FOUR_RANKS.items():
        zero = [e for e in extra if e.startswith("parallel.zero_stage")]
        out[name] = strip(train(small_overrides(kind, head) + BATCH + zero + ["train.grad_accum=4",
                                                                             f"run_dir={tmp}/{name}"], STEPS))
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
    return out


def _four_ranks(rank, world_size, tmp):
    out = {}
    for name, ((kind, head), extra) in FOUR_RANKS.items():
        tp = 2 if "parallel.tensor=2" in extra else 1
        layout(tp, 2)
        out[name] = strip(train(small_overrides(kind, head) + BATCH + extra + [f"run_dir={tmp}/{name}"], STEPS))
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return run_ranks(_references, 1, args=(str(tmp_path_factory.mktemp("ref")),), timeout=600)[0]


def _check_same_run(runs, ref, what):
    """Every rank logged the reference's losses; the joined parameters match before and after."""
    for r in runs:
        for step in range(STEPS):
            a, b = r["losses"][step], ref["losses"][step]
            assert abs(a - b) <= 1e-5 * abs(b), f"{what}: step {step} loss {a} vs {b} (PP=1)"
    initial = merge_ranks([{**r, "params": r["initial"]} for r in runs])
    err, name = max_relative_difference(initial, ref["initial"])
    assert err == 0.0, f"{what}: initial weights differ from PP=1 ({name}: {err:.2e})"
    assert_params_close(merge_ranks(runs), ref["params"], what)
    # the run trained: the parameters moved
    moved, _ = max_relative_difference(ref["params"], ref["initial"])
    assert moved > 1e-3


def test_pp2_matches_pp1_for_every_head_token_kind_and_cut(references, tmp_path):
    runs = run_ranks(_pp2, 2, args=(str(tmp_path),), timeout=900)
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
        _check_same_run([r[name] for r in runs], references[name], name)
