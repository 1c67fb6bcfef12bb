"""PNG plots of a grid: each score against optimizer steps and against training FLOPs, one line per
variant (the mean over its seeds, with the seeds' range shaded when there are several)."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from .results import SCORES, VariantResult

X_AXES = {"step": "optimizer steps", "train_flops": "training FLOPs"}


def _mean_curve(variant: VariantResult, key: str, x: str) -> Tuple[List[float], List[float], List[float], List[float]]:
    """Mean, min and max over seeds at the evaluation points all seeds share (same steps -> same FLOPs)."""
    curves = [dict(r.curve(key, x)) for r in variant.runs if r.curve(key, x)]
    if not curves:
        return [], [], [], []
    xs = sorted(set.intersection(*(set(c) for c in curves)))
    if not xs:  # seeds evaluated at different points: fall back to the longest one
        longest = max(curves, key=len)
        curves, xs = [longest], sorted(longest)
    ys = [[c[p] for c in curves] for p in xs]
    return xs, [sum(v) / len(v) for v in ys], [min(v) for v in ys], [max(v) for v in ys]


def plot_scores(variants: Sequence[VariantResult], out_dir: str, title: str) -> Dict[Tuple[str, str], str]:
    """Write ``<score>_vs_<x>.png`` for every score any run logged; returns {(score, x): path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written: Dict[Tuple[str, str], str] = {}
    keys = [k for k in SCORES if any(r.curve(k) for v in variants for r in v.runs)]
    for key in keys:
        label, higher = SCORES[key]
        for x, xlabel in X_AXES.items():
            fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=110)
            for i, v in enumerate(variants):
                xs, mean, lo, hi = _mean_curve(v, key, x)
                if not xs:
                    continue
                color = f"C{i % 10}"
                seeds = len([r for r in v.runs if r.curve(key, x)])
                ax.plot(xs, mean, marker="o", markersize=3, color=color, label=f"{v.name} (n={seeds})")
                if seeds > 1:
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{label} ({'higher' if higher else 'lower'} is better)")
            ax.set_title(f"{title}: {label} vs {xlabel}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="best")
            fig.tight_layout()
            path = os.path.join(out_dir, f"{key}_vs_{'flops' if x == 'train_flops' else 'steps'}.png")
            tmp = path + ".tmp.png"
            fig.savefig(tmp)
            plt.close(fig)
            os.replace(tmp, path)
            written[(key, x)] = path
    return written
