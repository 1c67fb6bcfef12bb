"""Strict loading of public tokenizer checkpoints from a local path, with errors that say what to do.

Nothing is downloaded: a missing or mismatched file is an error naming the file, the expected
format and where the public weights are published.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


class TokenizerCheckpointError(RuntimeError):
    """The tokenizer weights are missing, unreadable, or do not fit the architecture."""


def load_public_checkpoint(module: nn.Module, path: Optional[str], *, tokenizer: str, expected_format: str,
                           published_at: str, container_keys: Sequence[str] = ("model",),
                           training_only_prefixes: Sequence[str] = ()) -> None:
    """Load ``path`` into ``module`` with strict key *and* shape matching.

    ``container_keys``: the dict entries that may hold the state dict (the public files wrap it,
    e.g. ``{"model": ...}``); a bare state dict is accepted too. Keys under
    ``training_only_prefixes`` (e.g. a GAN discriminator saved alongside) are dropped with a log line.
    """
    hint = (f"The {tokenizer} tokenizer expects {expected_format}. The public weights are published at "
            f"{published_at}; download them on a machine with internet and pass the local file with "
            f"tokenizer.ckpt=PATH (or --tokenizer-ckpt PATH).")
    if not path:
        raise TokenizerCheckpointError(f"tokenizer.ckpt is not set. {hint}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise TokenizerCheckpointError(f"tokenizer checkpoint '{path}' does not exist. {hint}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip failure means the same to the user
        raise TokenizerCheckpointError(f"tokenizer checkpoint '{path}' cannot be read by torch.load "
                                       f"({type(e).__name__}: {e}). {hint}") from None
    state = _unwrap(blob, container_keys)
    if state is None:
        keys = list(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise TokenizerCheckpointError(f"tokenizer checkpoint '{path}' holds no state dict (top level: {keys}). "
                                       f"{hint}")
    dropped = [k for k in state if any(k.startswith(p) for p in training_only_prefixes)]
    if dropped:
        log.info("%s: ignoring %d training-only entries of %s (%s...)", tokenizer, len(dropped), path, dropped[0])
        state = {k: v for k, v in state.items() if k not in set(dropped)}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise TokenizerCheckpointError(f"tokenizer checkpoint '{path}' does not match the {tokenizer} architecture: "
                                       f"{'; '.join(parts)}. {hint}")
    module.load_state_dict(state, strict=True)
    log.info("%s: loaded %d tensors from %s", tokenizer, len(state), path)


def _unwrap(blob, container_keys: Sequence[str]) -> Optional[Dict[str, torch.Tensor]]:
    if not isinstance(blob, dict):
        return None
    for key in container_keys:
        if isinstance(blob.get(key), dict):
            return blob[key]
    if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return blob
    return None
