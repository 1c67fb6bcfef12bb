"""Check every file a run reads against its config before any process group exists or anything is written.

The config itself is validated when it is loaded (:mod:`heptapod_ds.config.loader`); this adds what
needs the files: the DeepSpeed JSON (batch sizes, precision, ZeRO stage against the training config),
the training beton (tokenizer, image size, fields), an explicit resume path. Every rank runs it: a
failure on one is a failure on all, before any of them waits on another.
"""
from __future__ import annotations

import os


def check_inputs(cfg) -> None:
    """Raise :class:`~heptapod_ds.config.ConfigError` or :class:`~heptapod_ds.data.format.BetonError`."""
    from heptapod_ds.data.datasets import DIGITS, _check_digits_config
    from heptapod_ds.data.format import verify_beton
    from heptapod_ds.engine.ds_config import resolve

    resolve(cfg)  # the JSON that DeepSpeed will get; contradictions with the training config are errors
    if cfg.data.path == DIGITS:
        _check_digits_config(cfg)  # built (or reused from the cache) after start-up
    else:
        verify_beton(os.path.abspath(os.path.expanduser(cfg.data.path)), cfg.tokenizer, full_checksum=False)
    if cfg.checkpoint.resume not in ("auto", "none"):
        from heptapod_ds.engine.checkpoint import CheckpointManager

        CheckpointManager(cfg)._resume_target()  # FileNotFoundError that names the path
