"""Recognise a failed collective (a peer rank died or hangs) and say what to do about it.

With gloo a dead peer shows up as a closed connection at once; a hung peer (or a dead one under
NCCL) as a timeout after ``parallel.collective_timeout_s``. Either way every surviving rank gets an
exception from inside a collective: :func:`collective_failure` tells those apart from bugs, so
that the entry point can print one clear line and exit instead of hanging in the tear-down.
"""
from __future__ import annotations

from typing import Optional

# what gloo / NCCL / c10d put in these errors; gloo's own wording for a peer that stopped answering inside an
# all-reduce is "Application timeout caused pair closure" (seen when a pipeline stage's rank hung)
_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "pair closure",
            "broken pipe", "socket", "peer")


def collective_failure(exc: BaseException) -> Optional[str]:
    """A one-line description if ``exc`` comes from a failed collective, else ``None``."""
    import torch.distributed as dist

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, getattr(dist, "DistError", ())):
        return first
    if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _MARKERS):
        return first
    return None
