"""Print every size preset's parameter counts and training FLOPs per image.

    python -m heptapod_ds.presets            # table
    python -m heptapod_ds.presets --json     # JSON, per preset:
        # {"backbone": n, "head": n, "diffusion": n, "total": n, "train_flops_per_image": n}
    python -m heptapod_ds.presets --pipeline 4 [H ...]   # the auto stage split over 4 stages, per preset
    python -m heptapod_ds.presets --pipeline 4 --split 10,10,10,10 H   # an explicit split's FLOP shares

Counts and FLOPs come from the analytic cost model (heptapod_ds.cost), checked against a built model in tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import Dict, List, Optional, Sequence


def preset_table(presets: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, int]]:
    from heptapod_ds.config.loader import load_config
    from heptapod_ds.config.presets import PRESETS
    from heptapod_ds.cost.flops import param_totals as param_counts, train_flops_per_image

    names = list(presets or PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}.")
    table = {}
    for name in names:
        cfg = load_config(overrides=[f"preset={name}"], world_size=1, validate_config=False)
        row = param_counts(cfg)
        row["train_flops_per_image"] = train_flops_per_image(cfg)
        table[name] = row
    return table


def format_table(table: Dict[str, Dict[str, int]]) -> str:
    head = f"{'preset':<7}{'backbone':>12}{'head':>12}{'diffusion':>12}{'total':>12}{'train GFLOPs/img':>18}"
    lines: List[str] = [head, "-" * len(head)]
    for name, r in table.items():
        sizes = "".join(f"{r[k] / 1e6:>11.2f}M" for k in ("backbone", "head", "diffusion", "total"))
        lines.append(f"{name:<7}{sizes}{r['train_flops_per_image'] / 1e9:>18.1f}")
    lines.append("diffusion = per-token output (diffusion MLP; the classifier for discrete tokenizers).")
    return "\n".join(lines)


def pipeline_table(stages: int, presets: Optional[Sequence[str]] = None, split: str = "auto"):
    """{preset: PipelineSplit} of each preset over ``stages`` pipeline stages."""
    from heptapod_ds.config.loader import load_config
    from heptapod_ds.config.presets import PRESETS
    from heptapod_ds.pipeline import split_model

    names = list(presets or [p for p in PRESETS if p != "tiny"])
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)}.")
    out = {}
    for name in names:
        cfg = load_config(overrides=[f"preset={name}"], world_size=1, validate_config=False)
        out[name] = (cfg, split_model(cfg, stages=stages, split=split))
    return out


def format_pipeline(table, micro_batches: Optional[int]) -> str:
    from heptapod_ds.pipeline import describe

    blocks = []
    for name, (cfg, split) in table.items():
        m = micro_batches if micro_batches is not None else cfg.train.global_batch_size // cfg.train.micro_batch_size
        blocks.append(f"preset {name} ({cfg.head.type} head, micro-batch {cfg.train.micro_batch_size}, {m} micro-batches "
                      f"per step at data-parallel size 1):\n"
                      + describe(cfg, split, micro_batches=m))
    return "\n\n".join(blocks)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m heptapod_ds.presets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--pipeline", type=int, default=None, metavar="P",
                        help="print the pipeline stage split over P stages instead (FLOP share per stage)")
    parser.add_argument("--split", default="auto", help="with --pipeline: auto (default) or layers per stage, "
                        "e.g. 10,10,10,10")
    parser.add_argument("--micro-batches", type=int, default=None, help="with --pipeline: micro-batches per "
                        "step for the bubble estimate (default: the preset's global / micro batch)")
    parser.add_argument("presets", nargs="*", help="presets to show (default: all; with --pipeline all but tiny)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # megatron warns about missing Apex/TE on every import
    logging.disable(logging.WARNING)
    if args.pipeline is not None:
        try:
            table = pipeline_table(args.pipeline, args.presets or None, args.split)
        except ValueError as e:
            parser.error(str(e))
        if args.json:
            out = {n: {"counts": s.counts, "shares": s.shares, "links": [list(st.links) for st in s.stages]}
                   for n, (_, s) in table.items()}
            sys.stdout.write(json.dumps(out, indent=2) + "\n")
        else:
            sys.stdout.write(format_pipeline(table, args.micro_batches) + "\n")
        return
    try:
        table = preset_table(args.presets or None)
    except ValueError as e:
        parser.error(str(e))
    sys.stdout.write((json.dumps(table, indent=2) if args.json else format_table(table)) + "\n")


if __name__ == "__main__":
    main()
