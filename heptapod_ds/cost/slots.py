"""Which slots of the 2D head are computed: the one definition shared by the model and the cost model.

The global head reads every one of the N + 1 slots at every timestep. The local head at timestep t reads
only the prefix ``0..t`` (keys and values) and the window ``t+1..t+W``: ``needed_length(t) = min(t + 1 + W,
N + 1)`` slots, the first ones of the sequence. In training its (image, timestep) sequences are cut to
that length and grouped into ``head.length_buckets`` length buckets, each padded to its longest (the
padding slots attend to themselves only and are never read, exactly as the slots after the window of
the uncut head): the buckets' edges are the needed lengths at the quantiles of t, so every bucket holds
about the same share of the uniformly drawn timesteps and the set of shapes is fixed by the config. In
sampling every sequence of a step has the same t, so it is cut to ``needed_length(t)`` exactly.
"""
from __future__ import annotations

from typing import List, Optional, Tuple


def needed_length(t: int, num_tokens: int, window: Optional[int]) -> int:
    """Slots the head reads at timestep t (``window=None``: the global head, all N + 1)."""
    if window is None:
        return num_tokens + 1
    return min(t + 1 + window, num_tokens + 1)


def bucket_lengths(num_tokens: int, window: Optional[int], buckets: int) -> Tuple[int, ...]:
    """The computed sequence lengths of training, ascending (the buckets' edges; duplicates merged)."""
    if window is None:
        return (num_tokens + 1,)
    if buckets < 1:
        raise ValueError(f"head.length_buckets={buckets} must be at least 1.")
    edges = {needed_length(-(-(k + 1) * num_tokens // buckets) - 1, num_tokens, window) for k in range(buckets)}
    return tuple(sorted(edges))


def computed_length(t: int, num_tokens: int, window: Optional[int], edges: Tuple[int, ...]) -> int:
    """The length a sequence of timestep t is computed at in training: the first edge that holds it."""
    need = needed_length(t, num_tokens, window)
    for edge in edges:
        if edge >= need:
            return edge
    raise ValueError(f"no bucket holds {need} slots (edges {edges}).")


def head_window(cfg) -> Optional[int]:
    """The local head's window, None for the global head."""
    return cfg.head.window if cfg.head.type == "local" else None


def expected_sequences(cfg) -> List[Tuple[int, float]]:
    """[(computed length, head sequences per image at that length)] of a training step, timesteps uniform
    over 0..N-1 (T sequences per image in all); [] for the next head."""
    head, n = cfg.head, cfg.tokenizer.num_tokens
    if head.type == "next":
        return []
    window = head_window(cfg)
    edges = bucket_lengths(n, window, head.length_buckets)
    share = {}
    for t in range(n):
        length = computed_length(t, n, window, edges)
        share[length] = share.get(length, 0.0) + head.timesteps / n
    return sorted(share.items())


def sampling_lengths(cfg) -> List[int]:
    """The head's sequence length at each of the N sampling steps (one timestep per step); [] for next."""
    if cfg.head.type == "next":
        return []
    n = cfg.tokenizer.num_tokens
    return [needed_length(t, n, head_window(cfg)) for t in range(n)]
