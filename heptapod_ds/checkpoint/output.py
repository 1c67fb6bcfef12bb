"""Write an output folder all at once: into a hidden staging folder beside it, renamed at the end.

Nothing half-written is left under the final name: a failure (or Ctrl-C) removes the staging folder,
and an existing output is replaced only with ``force`` (moved aside first, deleted after the rename).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import time
from typing import Iterator


class OutputExistsError(FileExistsError):
    pass


def check_free(out, force: bool) -> pathlib.Path:
    """Refuse an existing ``out`` unless ``force``; call before any work is done."""
    out = pathlib.Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it, or choose another "
                                f"--out.")
    return out


@contextlib.contextmanager
def staged_dir(out, force: bool) -> Iterator[pathlib.Path]:
    """Yield an empty staging folder; on success it becomes ``out`` with one rename."""
    out = check_free(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{time.time_ns()}"
        os.rename(out, trash)
    os.rename(staging, out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
