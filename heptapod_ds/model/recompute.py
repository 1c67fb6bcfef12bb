"""Activation recompute of the model's parts through ``torch.utils.checkpoint`` (CPU and GPU).

What is recomputed is decided by :func:`heptapod_ds.cost.recompute.plan` (Megatron's granularity /
method / num_layers per part). Megatron's own ``tensor_parallel.checkpoint`` saves CUDA RNG states and
raises without a CUDA driver, so the regions here use ``torch.utils.checkpoint.checkpoint`` (non-reentrant,
``preserve_rng_state=True``: the default generator of the CPU and of the inputs' GPU is replayed) and
additionally replay megatron's RNG-tracker states (the TP regions' dropout forks them), so the
recomputed forward draws exactly the dropout masks and noise of the first one.

The wrapping is an instance attribute ``forward`` on the chosen modules: module names, parameters,
hooks (DeepSpeed ZeRO-3 gathers in its pre-forward hooks, which the recompute re-runs for every
submodule) and checkpoints are unchanged. Without gradients (sampling, evaluation) and with a KV cache
a region runs as a plain call.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from heptapod_ds.cost.measure import note_region_inputs
from heptapod_ds.cost.recompute import plan


def _tracker():
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    except Exception:  # noqa: BLE001 - no megatron: nothing to replay
        return None
    return get_cuda_rng_tracker()


def _snapshot(tracker):
    if tracker is None:
        return None
    states = tracker.get_states()
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in states.items()}


def _restore(tracker, states) -> None:
    if tracker is not None and states is not None:
        tracker.set_states(dict(states))


def checkpointed_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` whose saved activations are recomputed in backward, RNG replayed."""
    if not torch.is_grad_enabled() or kwargs.get("inference_context") is not None:
        return fn(*args, **kwargs)
    note_region_inputs(args, kwargs)
    tracker = _tracker()
    entry = _snapshot(tracker)
    calls = [0]

    def region(*a, **k):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*a, **k)
        current = _snapshot(tracker)  # the recompute runs in backward: leave the tracker as it found it
        _restore(tracker, entry)
        try:
            return fn(*a, **k)
        finally:
            _restore(tracker, current)

    return checkpoint(region, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


class Recomputed:
    """A module's original ``forward`` run as one checkpointed region (survives ``copy.deepcopy``)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return checkpointed_call(self.forward, *args, **kwargs)


class _Chunk:
    """Consecutive layers ``forwards`` checkpointed as one region (Megatron's uniform chunks)."""

    def __init__(self, forwards):
        self.forwards = forwards
        self.pending = 0

    def run(self, hidden_states, **kwargs):
        context = kwargs.pop("context", None)
        for fwd in self.forwards:
            hidden_states, context = fwd(hidden_states=hidden_states, context=context, **kwargs)
        return hidden_states, context


class ChunkFirst:
    """The first layer of a chunk: runs the whole chunk in one region; the others then pass through."""

    def __init__(self, chunk: _Chunk):
        self.chunk = chunk

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled() or kwargs.get("inference_context") is not None:
            return self.chunk.forwards[0](*args, **kwargs)
        if args:
            kwargs["hidden_states"], args = args[0], args[1:]
        assert not args, "TransformerLayer is called with keyword arguments"
        self.chunk.pending = len(self.chunk.forwards) - 1
        return checkpointed_call(self.chunk.run, **kwargs)


class ChunkRest:
    """A later layer of a chunk: its forward already ran inside the chunk's region."""

    def __init__(self, chunk: _Chunk, forward):
        self.chunk = chunk
        self.forward = forward

    def __call__(self, *args, **kwargs):
        if self.chunk.pending <= 0:
            return self.forward(*args, **kwargs)
        self.chunk.pending -= 1
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden, kwargs.get("context")


def _wrap(module) -> None:
    if isinstance(module.__dict__.get("forward"), (Recomputed, ChunkFirst, ChunkRest)):
        return  # applied once
    module.forward = Recomputed(module.forward)


def apply_recompute(model, cfg) -> None:
    """Wrap the parts of a :class:`HeptapodModel` that ``cfg.recompute`` recomputes (no-op for ``none``)."""
    what = plan(cfg)
    if what["granularity"] == "none":
        return
    stacks = {"backbone": model.backbone, "head": model.head}
    for part in what["selective"]:
        for layer in stacks[part].decoder.layers:
            _wrap(layer.self_attention.core_attention)
    for part, chunks in what["chunks"].items():
        layers = list(stacks[part].decoder.layers)
        for first, end in chunks:
            if end - first == 1:
                _wrap(layers[first])
                continue
            if isinstance(layers[first].__dict__.get("forward"), (Recomputed, ChunkFirst, ChunkRest)):
                continue
            chunk = _Chunk([layers[i].forward for i in range(first, end)])
            layers[first].forward = ChunkFirst(chunk)
            for i in range(first + 1, end):
                layers[i].forward = ChunkRest(chunk, chunk.forwards[i - first])
    if what["output"]:
        _wrap(model.output)


def describe(cfg) -> str:
    """One line for the start-up log: what is recomputed."""
    what = plan(cfg)
    if what["granularity"] == "none":
        return "recompute: none"
    if what["granularity"] == "selective":
        return f"recompute: selective (core attention) in {', '.join(what['selective']) or 'nothing'}"
    parts = [f"{p} {len(c)} region(s)" for p, c in what["chunks"].items()]
    if what["output"]:
        parts.append("output")
    return f"recompute: full, {cfg.recompute.method}, num_layers={cfg.recompute.num_layers}: {', '.join(parts)}"
