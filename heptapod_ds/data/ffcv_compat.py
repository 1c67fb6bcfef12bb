"""Keep FFCV from changing PyTorch's thread count, and from spending seconds on its import.

FFCV 1.0.2's ``Compiler.set_num_threads`` sets numba's *and torch's* global intra-op thread count
to the loader's worker count, at import time (to 1) and again at every loader and every epoch. The
training step then runs its matmuls on ``data.num_workers`` threads: on the 2-core CPU demo that
halved the training speed. :func:`ensure_patched` makes FFCV set numba's threads only, and restores
torch's count after FFCV's import. Call it before importing any ``ffcv`` module.

FFCV's ``fields/rgb_image.py`` builds a two-entry ``numba.typed.Dict`` at import time (the JPEG/raw mode
codes). Constructing a typed dict JIT-compiles numba's dict implementation: 5-7 s of CPU in every
process that imports FFCV, cached nowhere, for a table that FFCV only ever reads from Python (its
decoders copy the two integers into their closures before compiling). :func:`ensure_patched` imports
that module with ``numba.typed.Dict`` standing in as a plain ``dict`` and restores numba right after;
nothing FFCV does with the table changes.
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
    import numba.typed

    had_dict = "Dict" in vars(numba.typed)
    saved = vars(numba.typed).get("Dict")
    numba.typed.Dict = dict  # read only in Python by FFCV; see the module docstring
    try:
        import ffcv.fields.rgb_image  # noqa: F401 - the import whose typed dict is replaced
    finally:
        if had_dict:
            numba.typed.Dict = saved
        else:
            del numba.typed.Dict  # numba.typed resolves Dict lazily again
    from ffcv.pipeline.compiler import Compiler

    def set_num_threads(cls, n: int) -> None:
        n = n if n >= 1 else (os.cpu_count() or 1)
        cls.num_threads = n
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))

    Compiler.set_num_threads = classmethod(set_num_threads)
    torch.set_num_threads(threads)
    _PATCHED = True
