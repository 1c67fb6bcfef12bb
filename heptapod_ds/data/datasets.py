"""``ensure_dataset(cfg)``: the beton a run trains on, built (digits) or checked (any other path).

The embedded digits beton is cached under ``data.cache_dir`` (``$HEPTAPOD_CACHE`` replaces the
default folder), one file per tokenizer setting. It is written by the same :func:`pretokenize`
as ImageNet. Every rank may call this at once: the first to take the output lock builds, the
others wait on the lock and then reuse the file. A cache that fails verification is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

from ..config.schema import DataConfig, HeptapodConfig
from .format import BetonError, tokenizer_record, verify_beton
from .locking import OutputLock
from .pretokenize import Coordinator, PretokenizeOptions, pretokenize

log = logging.getLogger(__name__)

DIGITS = "digits"
DEFAULT_CACHE_DIR = DataConfig().cache_dir
DIGITS_BUILD_WAIT_S = 600.0


def resolve_cache_dir(data: DataConfig) -> str:
    """``data.cache_dir``, except that ``$HEPTAPOD_CACHE`` replaces the *default* folder (tests, clusters)."""
    path = data.cache_dir
    if path == DEFAULT_CACHE_DIR and os.environ.get("HEPTAPOD_CACHE"):
        path = os.environ["HEPTAPOD_CACHE"]
    return os.path.abspath(os.path.expanduser(path))


def digits_beton_path(cfg: HeptapodConfig) -> str:
    record = tokenizer_record(cfg.tokenizer)
    tag = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(resolve_cache_dir(cfg.data), f"digits_{cfg.tokenizer.name}_{tag}.beton")


def _check_digits_config(cfg: HeptapodConfig) -> None:
    tok = cfg.tokenizer
    problems = []
    if tok.name not in ("pixel", "patch"):
        problems.append(f"tokenizer.name={tok.name} (the digits work with pixel or patch)")
    if tok.image_size != 8:
        problems.append(f"tokenizer.image_size={tok.image_size} (digits are 8x8)")
    if tok.name == "pixel" and tok.vocab_size != 17:
        problems.append(f"tokenizer.vocab_size={tok.vocab_size} (digit pixels take the 17 levels 0..16)")
    if tok.name == "patch" and tok.channels != tok.stride ** 2:
        problems.append(f"tokenizer.channels={tok.channels} (grey patches of stride {tok.stride} have "
                        f"{tok.stride ** 2} channels)")
    if cfg.backbone.num_classes != 10:
        problems.append(f"backbone.num_classes={cfg.backbone.num_classes} (the digits have 10 classes)")
    if problems:
        raise BetonError("data.path=digits does not fit the config: " + "; ".join(problems) + ".")


def ensure_digits(cfg: HeptapodConfig) -> str:
    from ..tokenizers import build_tokenizer
    from .sources import DigitsSource

    _check_digits_config(cfg)
    path = digits_beton_path(cfg)
    try:
        verify_beton(path, cfg.tokenizer, full_checksum=True)
        return path
    except BetonError as e:
        first_reason = e
    with OutputLock(path, wait_s=DIGITS_BUILD_WAIT_S):
        try:  # another rank may have built it while we waited for the lock
            verify_beton(path, cfg.tokenizer, full_checksum=True)
            return path
        except BetonError as e:
            if os.path.exists(path):
                log.warning("digits cache %s is unusable (%s); rebuilding it", path, e)
            else:
                log.info("building the digits cache %s (%s)", path, first_reason.__class__.__name__)
        opts = PretokenizeOptions(batch_size=512, shard_size=4096, decode_workers=1, write_workers=1, force=True,
                                  progress=False, device="cpu")
        pretokenize(DigitsSource(), build_tokenizer(cfg.tokenizer), cfg.tokenizer, path, opts, Coordinator(),
                    take_lock=False)
    verify_beton(path, cfg.tokenizer, full_checksum=True)
    return path


def ensure_dataset(cfg: HeptapodConfig) -> str:
    """The absolute path of the beton to train on, checked against ``cfg`` (shape, dtype, tokenizer)."""
    if cfg.data.path == DIGITS:
        return ensure_digits(cfg)
    path = os.path.abspath(os.path.expanduser(cfg.data.path))
    verify_beton(path, cfg.tokenizer)
    return path
