"""Print every size preset's parameter counts and training FLOPs per image.

    python -m heptapod_ds.presets            # table
    python -m heptapod_ds.presets --json     # JSON, per preset:
        # {"backbone": n, "head": n, "diffusion": n, "total": n, "train_flops_per_image": n}

Models are built on the meta device, so counting costs no memory.
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
    from heptapod_ds.model.flops import param_counts, train_flops_per_image

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


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m heptapod_ds.presets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("presets", nargs="*", help="presets to show (default: all)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # megatron warns about missing Apex/TE on every import
    logging.disable(logging.WARNING)
    try:
        table = preset_table(args.presets or None)
    except ValueError as e:
        parser.error(str(e))
    sys.stdout.write((json.dumps(table, indent=2) if args.json else format_table(table)) + "\n")


if __name__ == "__main__":
    main()
