"""Read what a grid's runs left behind (summary.json, the evaluation records of metrics.jsonl,
ablate_run.json) and reduce it per variant: final and best scores, mean and spread over seeds,
scores at an equal training-compute budget."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .grid import RunSpec
from .runner import read_record, run_state

# Scores the trainer logs at every evaluation: key -> (label, higher is better).
SCORES: Dict[str, Tuple[str, bool]] = {
    "class_consistency": ("class-consistency", True),
    "frechet_distance": ("Fréchet distance (digits)", False),
    "fid": ("FID", False),
}
# Keys that mark an evaluation record of metrics.jsonl: the periodic scoring (eval.every) and the
# in-training FID (eval.fid_every); records of one step are merged.
EVAL_MARKERS = ("eval_samples", "fid_samples")


@dataclass
class RunResult:
    spec: RunSpec
    state: str
    summary: Optional[Dict] = None
    evals: List[Dict] = field(default_factory=list)  # one record per evaluation, by step
    attempts: List[Dict] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.summary is not None

    @property
    def failed(self) -> bool:
        return not self.done and bool(self.attempts) and self.attempts[-1].get("rc") not in (0, 75)

    @property
    def steps(self) -> Optional[int]:
        if self.summary is not None:
            return self.summary.get("steps")
        return self.evals[-1]["step"] if self.evals else None

    @property
    def train_flops(self) -> Optional[float]:
        if self.summary is not None and self.summary.get("train_flops") is not None:
            return float(self.summary["train_flops"])
        return float(self.evals[-1]["train_flops"]) if self.evals else None

    @property
    def process_wall_s(self) -> float:
        """Wall time of all attempts, start-up and evaluation included."""
        return float(sum(a.get("wall_s", 0.0) for a in self.attempts))

    def curve(self, key: str, x: str = "step") -> List[Tuple[float, float]]:
        return [(float(r[x]), float(r[key])) for r in self.evals if _finite(r.get(key)) and r.get(x) is not None]

    def final(self, key: str) -> Optional[float]:
        if self.summary is not None and _finite(self.summary.get(key)):
            return float(self.summary[key])
        pts = self.curve(key)
        return pts[-1][1] if pts else None

    def best(self, key: str) -> Optional[float]:
        values = [v for _, v in self.curve(key)]
        final = self.final(key)
        if final is not None:
            values.append(final)
        if not values:
            return None
        return max(values) if SCORES[key][1] else min(values)

    def at_flops(self, key: str, budget: float) -> Optional[float]:
        """The score linearly interpolated at ``budget`` training FLOPs (None outside the curve)."""
        pts = self.curve(key, "train_flops")
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 <= budget <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
        if pts and math.isclose(pts[-1][0], budget, rel_tol=1e-9):
            return pts[-1][1]
        return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run(spec: RunSpec) -> RunResult:
    result = RunResult(spec=spec, state=run_state(spec))
    summary_path = os.path.join(spec.run_dir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as fh:
            result.summary = json.load(fh)
    metrics_path = os.path.join(spec.run_dir, "metrics.jsonl")
    if os.path.isfile(metrics_path):
        by_step: Dict[int, Dict] = {}
        with open(metrics_path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if any(k in rec for k in EVAL_MARKERS):
                    by_step.setdefault(int(rec["step"]), {}).update(rec)
        result.evals = [by_step[s] for s in sorted(by_step)]
    record = read_record(spec.run_dir)
    if record is not None:
        result.attempts = list(record.get("attempts", []))
    return result


@dataclass
class Stat:
    mean: float
    std: Optional[float]  # sample standard deviation over seeds; None with one seed
    n: int

    @classmethod
    def of(cls, values: Sequence[Optional[float]]) -> Optional["Stat"]:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        return cls(mean, std, len(vals))


@dataclass
class VariantResult:
    name: str
    overrides: Dict[str, str]  # the variant's own overrides (not the grid's base)
    runs: List[RunResult]

    @property
    def done_runs(self) -> List[RunResult]:
        return [r for r in self.runs if r.done]

    def scores(self) -> List[str]:
        return [k for k in SCORES if any(r.final(k) is not None for r in self.runs)]

    def stat(self, what: str, key: str) -> Optional[Stat]:
        runs = self.done_runs
        if what == "final":
            return Stat.of([r.final(key) for r in runs])
        if what == "best":
            return Stat.of([r.best(key) for r in runs])
        raise ValueError(what)

    def at_flops(self, key: str, budget: float) -> Optional[Stat]:
        return Stat.of([r.at_flops(key, budget) for r in self.done_runs])

    def mean_of(self, attr: str) -> Optional[Stat]:
        return Stat.of([getattr(r, attr) for r in self.done_runs])

    def summary_mean(self, key: str) -> Optional[Stat]:
        return Stat.of([r.summary.get(key) for r in self.done_runs if _finite(r.summary.get(key))])


def collect(specs: Sequence[RunSpec], variant_overrides: Dict[str, Dict[str, str]]) -> List[VariantResult]:
    """Results per variant, in the grid's order."""
    order: Dict[str, VariantResult] = {}
    for spec in specs:
        vr = order.setdefault(spec.variant, VariantResult(spec.variant, variant_overrides.get(spec.variant, {}), []))
        vr.runs.append(read_run(spec))
    return list(order.values())


def equal_flops_budget(variants: Sequence[VariantResult]) -> Optional[float]:
    """The largest training budget every finished variant reached: the smallest final FLOPs among them."""
    finals = [s.mean for s in (v.mean_of("train_flops") for v in variants) if s is not None]
    return min(finals) if finals else None
