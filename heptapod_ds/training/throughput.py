"""Throughput accounting: images/s, tokens/s, achieved TFLOP/s, MFU and memory."""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Dict, Iterator, Optional

import torch

# Dense bf16 peak TFLOP/s (no sparsity) of torch.cuda.get_device_name(): the first row whose words all
# occur in the name. Form factors first: an H100 PCIe (756) or NVL (835) is not an SXM H100 (989).
_PEAK_BF16_TFLOPS = ((("H100", "PCIe"), 756.0), (("H100", "NVL"), 835.0), (("H200", "NVL"), 835.0),
                     (("H800", "PCIe"), 756.0), (("GH200",), 989.0), (("H200",), 989.0), (("H100",), 989.0),
                     (("H800",), 989.0), (("B200",), 2250.0), (("A100",), 312.0), (("A800",), 312.0),
                     (("L40S",), 362.0), (("A6000",), 155.0), (("V100",), 125.0))


def peak_for_device_name(name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU model name as torch reports it, or None for an unknown model."""
    for words, value in _PEAK_BF16_TFLOPS:
        if all(w in name for w in words):
            return value
    return None


def peak_tflops(configured: float = 0.0) -> Optional[float]:
    """Peak TFLOP/s of one device: the configured value, else looked up for known GPUs, else None."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        return peak_for_device_name(torch.cuda.get_device_name())
    return None


def memory_gib() -> Dict[str, float]:
    if torch.cuda.is_available():
        return {"mem_alloc_gib": torch.cuda.memory_allocated() / 2**30,
                "mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {"mem_peak_rss_gib": rss_kib * scale / 2**30}


class ThroughputMeter:
    """Counts images between two ``report`` calls and turns them into rates for the whole job.

    Time spent inside :meth:`paused` (checkpoints, evaluation) is left out of the window."""

    def __init__(self, flops_per_image: float, tokens_per_image: int, world_size: int, peak: Optional[float]):
        self.flops_per_image = flops_per_image
        self.tokens_per_image = tokens_per_image
        self.world_size = world_size
        self.peak = peak
        self._images = 0
        self._t0 = time.perf_counter()
        self._excluded = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block's wall time out of the current window."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t0

    def add(self, images: int) -> None:
        self._images += images

    def report(self) -> Dict[str, float]:
        dt = max(time.perf_counter() - self._t0 - self._excluded, 1e-9)
        ips = self._images / dt
        tflops_per_device = ips * self.flops_per_image / self.world_size / 1e12
        out = {"images_per_s": ips, "tokens_per_s": ips * self.tokens_per_image,
               "tflops_per_device": tflops_per_device}
        if self.peak:
            out["mfu"] = tflops_per_device / self.peak
        self._images = 0
        self._t0 = time.perf_counter()
        self._excluded = 0.0
        return out
