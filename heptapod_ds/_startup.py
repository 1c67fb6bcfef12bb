"""Lighter first imports of megatron-core and DeepSpeed's Muon module on machines without CUDA.

Importing ``megatron.core`` decorates its fused kernels with ``torch.compile`` (importing TorchDynamo and
Inductor, ~2 s) and imports wandb for its inference engine (~1 s). On a CPU-only machine none of those
kernels is compiled before it is called and megatron's wandb hooks are never used, yet every process pays
for both at start-up: the test suite and the CPU demo start hundreds of ranks. While ``megatron.core`` is
first imported on such a machine, ``torch.compile`` is replaced by a wrapper that compiles on the first
call (what ``torch.compile`` does anyway, minus the eager import) and megatron's optional ``import wandb``
finds nothing. Both are restored as soon as the import is done, so our own wandb logging is unaffected.
With CUDA present, megatron is imported untouched.

DeepSpeed does the same in ``deepspeed/runtime/zero/muon/original_muon.py``, which its engine imports while
it checks the optimizer of every ZeRO stage > 0 (``is_zero_supported_optimizer``): three ``torch.compile``
decorators, TorchDynamo imported, about 3 s of CPU per rank on 2 cores. That module gets the same
compile-on-first-call wrapper (Muon is never called with our AdamW); wandb is not touched there.

Installed by ``heptapod_ds/__init__.py``; a module imported before heptapod_ds is left as it is.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys


def _deferred(real_compile):
    def compile_on_first_call(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile_on_first_call(fn, **kwargs)
        if not callable(model) or isinstance(model, type):
            return real_compile(model, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real_compile(model, **kwargs)
            return compiled(*args, **kw)
        return call
    return compile_on_first_call


# module -> whether its optional ``import wandb`` is blocked while it is first imported
_LIGHTER = {"megatron.core": True, "deepspeed.runtime.zero.muon.original_muon": False}


@contextlib.contextmanager
def _lighter_import(block_wandb: bool):
    import torch

    if torch.cuda.is_available():
        yield
        return
    real_compile = torch.compile
    blocked_wandb = block_wandb and "wandb" not in sys.modules
    torch.compile = _deferred(real_compile)
    if blocked_wandb:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError, which megatron treats as absent
    try:
        yield
    finally:
        torch.compile = real_compile
        if blocked_wandb and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


class _LighterFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of ``_LIGHTER`` as usual and runs their first execution inside
    :func:`_lighter_import`; removes itself once all of them have been found."""

    def __init__(self):
        self.pending = set()

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            uninstall()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            with _lighter_import(_LIGHTER[name]):
                real_exec(module)
        spec.loader.exec_module = exec_module
        return spec


_FINDER = _LighterFinder()


def install() -> None:
    _FINDER.pending = {name for name in _LIGHTER if name not in sys.modules}
    if _FINDER.pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
