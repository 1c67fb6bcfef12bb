"""Exact measurement of what a forward saves for backward (the check of :mod:`.memory`).

``saved_tensors_hooks`` sees every tensor autograd keeps for backward; its bytes are counted once per
storage (views share one), parameters and buffers left out (they are model states). Inside a
non-reentrant checkpoint region only the region's inputs are saved, which is what recompute keeps.
Each storage is attributed to the part (backbone, head, output) whose forward was running when it was
first saved; what the model's own glue saves (head-output indexing, loss weights) is ``other``.
No model code is imported: any module with ``backbone``/``head``/``output`` children works.
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch

_ACTIVE = []  # pack functions of the counters running now (checkpoint regions report their inputs here)


def note_region_inputs(args, kwargs) -> None:
    """A checkpointed region keeps its tensor inputs alive for backward without autograd saving them:
    count them like saved tensors (called by :func:`heptapod_ds.model.recompute.checkpointed_call`)."""
    if not _ACTIVE:
        return
    for value in list(args) + list(kwargs.values()):
        if torch.is_tensor(value):
            for pack in _ACTIVE:
                pack(value)


@contextlib.contextmanager
def count_saved(model, parts=("backbone", "head", "output")):
    """Yields a dict {part: bytes, "other": bytes, "total": bytes} filled while the block runs."""
    excluded = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
                if t.numel()}
    seen: Dict[int, str] = {}
    sizes: Dict[int, int] = {}
    keep = []
    current = ["other"]
    handles = []
    for name in parts:
        module = getattr(model, name, None)
        if module is None:
            continue

        def pre(_m, _a, name=name):
            current.append(name)

        def post(_m, _a, _o):
            current.pop()
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    def pack(t):
        if t.numel() and t.device.type != "meta":
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in excluded and ptr not in seen:
                seen[ptr] = current[-1]
                sizes[ptr] = storage.nbytes()
                keep.append(t)
        return t

    out: Dict[str, int] = {}
    _ACTIVE.append(pack)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield out
    finally:
        _ACTIVE.remove(pack)
        for h in handles:
            h.remove()
        for name in (*parts, "other"):
            out[name] = sum(sizes[p] for p, part in seen.items() if part == name)
        out["total"] = sum(sizes.values())
        keep.clear()


def saved_activation_bytes(model, tokens, labels, seeds, **kwargs) -> Dict[str, int]:
    """Bytes saved for backward by one training forward of ``model`` (the graph is then dropped)."""
    with count_saved(model) as out:
        loss, _ = model(tokens, labels, sample_seeds=seeds, **kwargs)
    del loss
    return out
