"""Keep FFCV from changing PyTorch's thread count.

FFCV 1.0.2's ``Compiler.set_num_threads`` sets numba's *and torch's* global intra-op thread count
to the loader's worker count, at import time (to 1) and again at every loader and every epoch. The
training step then runs its matmuls on ``data.num_workers`` threads: on the 2-core CPU demo that
halved the training speed. :func:`ensure_patched` makes FFCV set numba's threads only, and restores
torch's count after FFCV's import. Call it before importing any ``ffcv`` module.
"""
from __future__ import annotations

import os

import torch

_PATCHED = False


def ensure_patched() -> None:
    global _PATCHED
    if _PATCHED:
        return
    threads = torch.get_num_threads()
    import numba
    from ffcv.pipeline.compiler import Compiler

    def set_num_threads(cls, n: int) -> None:
        n = n if n >= 1 else (os.cpu_count() or 1)
        cls.num_threads = n
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))

    Compiler.set_num_threads = classmethod(set_num_threads)
    torch.set_num_threads(threads)
    _PATCHED = True
