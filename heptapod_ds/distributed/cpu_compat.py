"""Make megatron-core's CUDA assumptions hold on a CPU-only machine.

megatron-core 0.16 allocates buffers on ``torch.cuda.current_device()``, synchronizes CUDA streams,
forks a CUDA RNG-state tracker around dropout, and its pipeline schedules create
``torch.zeros(..., device="cuda")``. None of that works without CUDA. This module is the one place
that bridges the gap, so that every distributed feature can be tested on CPU with gloo:

* ``torch.cuda.current_device`` returns the CPU device and ``torch.cuda.synchronize`` is a no-op;
* Megatron's RNG tracker is replaced by :class:`CpuRNGStatesTracker`, which forks the CPU generator;
* the unfused softmax's default causal / sliding-window masks are built on CPU;
* :func:`cuda_factories_on_cpu` (a context manager) redirects ``device="cuda"`` tensor factories to
  CPU; the pipeline schedule runs inside it.

:func:`apply` does nothing when CUDA is available: on GPUs megatron-core runs unmodified.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_APPLIED = False
_ORIGINALS = {}
_CURRENT = [torch.device("cpu")]  # what the patched torch.cuda.current_device returns


def needed() -> bool:
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _APPLIED


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` whose named states are CPU generator states."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def _install_rng_tracker() -> CpuRNGStatesTracker:
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


def seed_model_parallel_rng(seed: int, tp_rank: int, ep_rank: int = 0) -> None:
    """CPU counterpart of megatron's ``model_parallel_cuda_manual_seed`` (same seed offsets)."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if not isinstance(tracker, CpuRNGStatesTracker):
        tracker = _install_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank)


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    # on the (patched) current device: the CPU, or the stand-in device of a device-strict check
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool, device=torch.cuda.current_device()), diagonal=1)


def _cpu_sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    m = torch.ones(sq, skv, dtype=torch.bool, device=torch.cuda.current_device())
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _patch_mask_builders() -> None:
    """The unfused softmax builds its default masks with ``device="cuda"``; build them on CPU."""
    from megatron.core.fusions import fused_softmax

    for name, repl in (("get_default_causal_mask", _cpu_causal_mask),
                       ("get_sliding_window_causal_mask", _cpu_sliding_window_mask)):
        _ORIGINALS[name] = getattr(fused_softmax, name)
        setattr(fused_softmax, name, repl)


def apply() -> bool:
    """Install the CPU bridges if CUDA is absent; idempotent. Returns whether they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not needed():
        return False
    _ORIGINALS["current_device"] = torch.cuda.current_device
    _ORIGINALS["synchronize"] = torch.cuda.synchronize
    torch.cuda.current_device = lambda: _CURRENT[0]
    torch.cuda.synchronize = lambda *a, **k: None
    _install_rng_tracker()
    _patch_mask_builders()
    _APPLIED = True
    log.debug("megatron-core CPU compatibility layer applied")
    return True


def remove() -> None:
    """Undo :func:`apply` (for tests)."""
    global _APPLIED
    if not _APPLIED:
        return
    torch.cuda.current_device = _ORIGINALS.pop("current_device")
    torch.cuda.synchronize = _ORIGINALS.pop("synchronize")
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    from megatron.core.fusions import fused_softmax

    for name in ("get_default_causal_mask", "get_sliding_window_causal_mask"):
        setattr(fused_softmax, name, _ORIGINALS.pop(name))
    _APPLIED = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index means a CUDA ordinal


class _CudaToCpu(TorchFunctionMode):
    """``device="cuda"`` factories, ``.cuda()`` and ``.to("cuda")`` on the current device (the CPU, or
    the stand-in device of :func:`stand_in_device`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = _CURRENT[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=target)
        if func in (torch.Tensor.cuda,):
            return args[0].to(target)
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], target) + tuple(args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def stand_in_device(device):
    """Within the block megatron's "current CUDA device" is ``device`` (e.g. ``meta``): where it allocates
    on the current device (KV cache, default masks, pipeline buffers) it allocates there. For the
    device-strict checks (:mod:`heptapod_ds.distributed.strict_device`); CPU-only, like the rest."""
    if not _APPLIED:
        raise RuntimeError("stand_in_device needs the CPU compatibility layer (a machine without CUDA).")
    before = _CURRENT[0]
    _CURRENT[0] = torch.device(device)
    try:
        with _CudaToCpu():
            yield
    finally:
        _CURRENT[0] = before


@contextlib.contextmanager
def cuda_factories_on_cpu():
    """Within the block, ``device="cuda"`` factories and ``.cuda()`` give CPU tensors (CPU only)."""
    if not _APPLIED:
        yield
        return
    with _CudaToCpu():
        yield
