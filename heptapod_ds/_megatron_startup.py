"""A lighter first import of megatron-core on machines without CUDA (about 3 of its 5.5 s on 2 cores).

Importing ``megatron.core`` decorates its fused kernels with ``torch.compile`` (importing TorchDynamo and
Inductor, ~2 s) and imports wandb for its inference engine (~1 s). On a CPU-only machine none of those
kernels is compiled before it is called and megatron's wandb hooks are never used, yet every process pays
for both at start-up: the test suite and the CPU demo start hundreds of ranks. While ``megatron.core`` is
first imported on such a machine, ``torch.compile`` is replaced by a wrapper that compiles on the first
call (what ``torch.compile`` does anyway, minus the eager import) and megatron's optional ``import wandb``
finds nothing. Both are restored as soon as the import is done, so our own wandb logging is unaffected.
With CUDA present, megatron is imported untouched.

Installed by ``heptapod_ds/__init__.py``; it does nothing if megatron was imported before heptapod_ds.
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


@contextlib.contextmanager
def _lighter_import():
    import torch

    if torch.cuda.is_available():
        yield
        return
    real_compile = torch.compile
    blocked_wandb = "wandb" not in sys.modules
    torch.compile = _deferred(real_compile)
    if blocked_wandb:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError, which megatron treats as absent
    try:
        yield
    finally:
        torch.compile = real_compile
        if blocked_wandb and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


class _MegatronCoreFinder(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core`` as usual and runs its first execution inside :func:`_lighter_import`."""

    def find_spec(self, name, path, target=None):
        if name != "megatron.core":
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            with _lighter_import():
                real_exec(module)
        spec.loader.exec_module = exec_module
        return spec


_FINDER = _MegatronCoreFinder()


def install() -> None:
    if "megatron.core" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
