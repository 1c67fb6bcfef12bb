"""Interleaved repeats and their statistics: the only way to compare on a shared, noisy machine."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List


def interleave(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each function, run round-robin ``repeats`` times after ``warmup`` rounds.

    Round-robin (a, b, c, a, b, c, ...) puts every variant under the same background load, so their
    ratio is meaningful even when absolute times drift.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(samples: List[float]) -> Dict[str, float]:
    """Median, min and max of a list of measurements."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def ratio_summary(num: List[float], den: List[float]) -> Dict[str, float]:
    """Median and spread of the per-round ratios num[i] / den[i] (paired: same round, same load)."""
    ratios = [a / b for a, b in zip(num, den)]
    return summary(ratios)
