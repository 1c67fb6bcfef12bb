"""Device-strict checks that run on a CPU-only machine: catch the two GPU-only bugs a CPU run cannot see.

On CPU every tensor lives on the host, so code that (a) mixes a host tensor into device arithmetic, or
(b) reads a device value back to the host (``.item()``, ``.tolist()``, ``int(t)``, ``.cpu()``, a Python
``if`` on a tensor) runs fine there, and on a GPU (a) crashes and (b) drains the stream. Running the same
code with the model and its inputs on a *stand-in* device, ``meta`` (shapes and dtypes, no data), makes
both visible: :class:`StrictDeviceMode` refuses every operator that takes a non-scalar host tensor
together with a stand-in tensor, and every copy of a stand-in tensor to the host (``meta`` itself refuses
reading values; the mode names the operator and the caller first).

Used by the tests (``tests/distributed/test_strict_device.py``, ``tests/model/test_device_strict.py``):
the training forward and backward of every head and token kind, a pipeline stage and a sampling step
run under it. :func:`count_host_reads` counts host reads of tensor values through a training step on
CPU, attributed to the code that made them (the project's own, or DeepSpeed's / megatron's).
"""
from __future__ import annotations

import contextlib
import os
import traceback
import weakref
from collections import Counter
from typing import Dict, Iterator, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

STAND_IN = torch.device("meta")


class DeviceStrictError(RuntimeError):
    """A host tensor met a device tensor, or a device value was read on the host."""


_MODE_HOOKS = ("__torch_function__", "__torch_dispatch__")


def _caller() -> str:
    """The innermost frame outside torch: where the offending call was written."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if not (path.startswith(torch_dir) or path == here or frame.name in _MODE_HOOKS):
            return f"{frame.filename}:{frame.lineno} ({frame.name}): {frame.line}"
    return "<inside torch>"


def _tensors(tree) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


class StrictDeviceMode(TorchDispatchMode):
    """Refuse host/stand-in mixing and stand-in-to-host copies (see the module docstring).

    0-dim host tensors may meet device tensors (CUDA accepts them as scalars, without a copy).
    ``collect``: a list to append each finding to instead of raising; the run then goes on (host tensors
    moved to the device, scalar reads answered with 1, host copies with zeros) so that one run lists every finding of a code path."""

    def __init__(self, device: torch.device = STAND_IN, collect: Optional[List[str]] = None):
        super().__init__()
        self.device = torch.device(device)
        self.collect = collect

    def _found(self, message: str) -> None:
        if self.collect is None:
            raise DeviceStrictError(message)
        self.collect.append(message)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = list(_tensors(args)) + list(_tensors(kwargs))
        if not any(t.device.type == self.device.type for t in tensors):
            return func(*args, **kwargs)
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
        if host:
            self._found(f"{func}: a host tensor {tuple(host[0].shape)} {host[0].dtype} meets a {self.device} "
                        f"tensor (on a GPU: a device mismatch or a hidden copy), at {_caller()}")
            move = lambda t: t.to(self.device) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
            args = torch.utils._pytree.tree_map(move, args)
            kwargs = torch.utils._pytree.tree_map(move, kwargs)
        target = kwargs.get("device")
        if func is torch.ops.aten._to_copy.default and target is not None and torch.device(target).type == "cpu":
            self._found(f"a {self.device} tensor copied to the host (on a GPU: a wait for the stream), at {_caller()}")
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        reads = {torch.ops.aten._local_scalar_dense.default: 1, torch.ops.aten.is_nonzero.default: False,
                 torch.ops.aten.equal.default: True}
        if func in reads:
            self._found(f"{func}: a {self.device} value read on the host (on a GPU: a wait for the stream), "
                        f"at {_caller()}")
            return reads[func]
        return func(*args, **kwargs)


@contextlib.contextmanager
def strict_device(device: torch.device = STAND_IN, collect: Optional[List[str]] = None):
    """Run the block on the stand-in ``device``: megatron's current device is it, and the mode is on."""
    from . import cpu_compat

    with cpu_compat.stand_in_device(device), StrictDeviceMode(device, collect):
        yield


# ------------------------------------------------------------------------------ counting host reads

_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
          torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__}


def _origin() -> str:
    """``project`` when the innermost non-torch frame is in heptapod_ds, else the package's name."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path.startswith(torch_dir) or path == here or "contextlib" in path or frame.name in _MODE_HOOKS:
            continue
        for name in ("heptapod_ds", "deepspeed", "megatron"):
            if f"{os.sep}{name}{os.sep}" in path:
                return "project" if name == "heptapod_ds" else name
        return os.path.basename(path)
    return "torch"


class _ReadCounter(TorchFunctionMode):
    def __init__(self, counts: Counter, sites: Dict[str, List[str]]):
        super().__init__()
        self.counts, self.sites = counts, sites
        self.copied: Dict[int, weakref.ref] = {}  # results of a counted copy: host tensors from then on

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        is_read = func in _READS
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            # a non-blocking copy does not wait (on CPU it stands for the step's host-to-device copies)
            is_read = (isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"
                       and not kwargs.get("non_blocking", False))
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        ref = self.copied.get(id(source)) if source is not None else None
        if is_read and ref is not None and ref() is source:
            is_read = False  # .cpu().tolist(): one read, not two
        if is_read:
            origin = _origin()
            self.counts[origin] += 1
            self.sites.setdefault(origin, []).append(_caller())
        out = func(*args, **kwargs)
        if is_read and isinstance(out, torch.Tensor):
            self.copied[id(out)] = weakref.ref(out)
        return out


@contextlib.contextmanager
def count_host_reads(counts: Counter, sites: Dict[str, List[str]]):
    """Count, inside the block, every read of a tensor's values on the host (``item``, ``tolist``,
    ``float``/``int``/``bool`` of a tensor, ``cpu``/``numpy``, a blocking ``to("cpu")``), by origin: ``project`` (heptapod_ds),
    ``deepspeed``, ``megatron``, or a file name. On CPU every tensor counts as a device tensor, so the
    count is what a GPU run would wait for (``sites`` lists where)."""
    with _ReadCounter(counts, sites):
        yield

