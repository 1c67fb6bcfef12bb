"""The local head's cut against the uncut head, side by side in one run: training and sampling.

Training: one forward + backward of the ``tiny`` model (the demo's local head, its micro-batch) with the
default ``head.length_buckets`` and with ``length_buckets=1`` (every sequence at the full N + 1 slots: the
computation of the uncut head), same weights and draws, interleaved. Sampling: ``generate`` with the
sequence of every step cut to the slots it reads, and uncut (the head's ``sampling_length`` made N + 1 for
this row only: the condition of slot t + 1 is the same, every slot is computed). Both print the
cost model's FLOPs beside the measured ratio.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch

from .timing import interleave, ratio_summary, summary


def _model(overrides: List[str]):
    from heptapod_ds.config import load_config
    from heptapod_ds.model import build_model

    cfg = load_config(overrides=overrides, world_size=1)
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def _uncut_sampling(head):
    """Make ``head`` compute all N + 1 slots at every sampling step (an instance attribute; undo with the
    returned callable)."""
    head.sampling_length = lambda t: head.num_slots
    return lambda: delattr(head, "sampling_length")


def run(micro_batch: int, sample_batch: int, repeats: int) -> List[Dict]:
    """Rows ``head/tiny/local_train`` and ``head/tiny/local_sampling``; call inside a 1-rank world."""
    from heptapod_ds.cost.flops import sample_flops_per_image, train_flops_per_image

    overrides = ["preset=tiny", "head.type=local", f"train.micro_batch_size={micro_batch}",
                 f"train.global_batch_size={micro_batch}", "train.grad_accum=1"]
    cfg, model = _model(overrides)
    uncut_cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, length_buckets=1))
    tok = cfg.tokenizer
    g = torch.Generator().manual_seed(4321)
    tokens = torch.randint(0, tok.vocab_size, (micro_batch, tok.num_tokens), generator=g)
    labels = torch.randint(0, cfg.backbone.num_classes, (micro_batch,), generator=g)
    seeds = torch.arange(micro_batch) + 9
    from heptapod_ds.model.draws import draw_batch

    draws = {"cut": draw_batch(cfg, micro_batch, seeds), "uncut": draw_batch(uncut_cfg, micro_batch, seeds)}

    def step(key):
        def fn():
            model.zero_grad(set_to_none=True)
            loss, _ = model(tokens, labels, draws=draws[key])
            loss.backward()
        return fn

    times = interleave({"cut": step("cut"), "uncut": step("uncut")}, repeats, warmup=1)
    flops = {"cut": train_flops_per_image(cfg), "uncut": train_flops_per_image(uncut_cfg)}
    rows = [{"row": "head/tiny/local_train", "micro_batch": micro_batch, "length_buckets": cfg.head.length_buckets,
             "cut_s": summary(times["cut"]), "uncut_s": summary(times["uncut"]),
             "uncut_over_cut": ratio_summary(times["uncut"], times["cut"]),
             "train_flops_per_image": flops, "computed_slots_per_image": {
                 "cut": _computed_slots(cfg), "uncut": _computed_slots(uncut_cfg)}}]

    model.eval()
    s_labels = torch.arange(sample_batch) % cfg.backbone.num_classes
    s_seeds = torch.arange(sample_batch)

    def sample_uncut():
        undo = _uncut_sampling(model.head)
        try:
            return model.generate(s_labels, s_seeds)
        finally:
            undo()

    same = torch.equal(model.generate(s_labels, s_seeds), sample_uncut())
    times = interleave({"cut": lambda: model.generate(s_labels, s_seeds), "uncut": sample_uncut},
                       max(2, repeats // 2), warmup=0)
    head_flops = _sampling_head_flops(cfg)
    rows.append({"row": "head/tiny/local_sampling", "batch": sample_batch,
                 "cut_images_per_s": sample_batch / summary(times["cut"])["median"],
                 "uncut_images_per_s": sample_batch / summary(times["uncut"])["median"],
                 "uncut_over_cut": ratio_summary(times["uncut"], times["cut"]),
                 "same_tokens": same, "head_flops_per_image": head_flops,
                 "sample_flops_per_image": sample_flops_per_image(cfg)})
    return rows


def _computed_slots(cfg) -> float:
    from heptapod_ds.cost.slots import expected_sequences

    return sum(length * count for length, count in expected_sequences(cfg))


def _sampling_head_flops(cfg) -> Dict[str, float]:
    """The head layers' sampling FLOPs per image, cut and uncut (cost model)."""
    from heptapod_ds.cost.flops import head_layer_flops
    from heptapod_ds.cost.slots import sampling_lengths

    n = cfg.tokenizer.num_tokens
    cut = sum(head_layer_flops(cfg, [(length, 1.0)]) for length in sampling_lengths(cfg)) * cfg.head.depth
    uncut = n * head_layer_flops(cfg, [(n + 1, 1.0)]) * cfg.head.depth
    return {"cut": cut, "uncut": uncut}
