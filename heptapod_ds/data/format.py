"""What a Heptapod beton holds, its summary JSON, and the checks that a beton fits a config.

Fields (in this order):

* continuous tokenizers: ``moments`` and ``moments_flip`` float32 [2C, h, w] (mean, log-variance of
  the image and of its horizontal flip, MAR's latent-cache layout);
* discrete tokenizers: ``codes`` and ``codes_flip`` int16 (int32 for codebooks > 32768) [h, w];
* ``label`` (int), ``index`` (row in this beton; the loader's ``sample_ids``) and ``source_index``
  (position of the image in the sorted source listing, to trace a row back to its file).

``FILE.beton.json`` beside the beton records count, classes, shapes, dtype, tokenizer, size and
sha256; it is written last, so a beton without it is incomplete.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..config.schema import TokenizerConfig
from ..tokenizers.base import discrete_storage_dtype
from .ffcv_compat import ensure_patched as ensure_ffcv_patched

FORMAT_VERSION = 1
LABEL, INDEX, SOURCE_INDEX = "label", "index", "source_index"
FULL_CHECKSUM_MAX_BYTES = 1 << 30
"""ensure_dataset re-hashes betons up to this size on every start; larger ones get cheaper checks."""


class BetonError(RuntimeError):
    """A beton that is missing, incomplete, corrupt, or does not fit the configuration."""


def view_fields(is_discrete: bool) -> Tuple[str, str]:
    return ("codes", "codes_flip") if is_discrete else ("moments", "moments_flip")


def expected_layout(tok: TokenizerConfig) -> Tuple[Tuple[int, ...], np.dtype]:
    """(shape, dtype) of one stored view for a tokenizer config."""
    g = tok.grid_size
    if tok.is_discrete:
        return (g, g), discrete_storage_dtype(tok.vocab_size)
    return (2 * tok.channels, g, g), np.dtype(np.float32)


def tokenizer_record(tok: TokenizerConfig) -> Dict[str, Any]:
    """The tokenizer fields that determine the stored data (scale_factor is applied at load time)."""
    return {"name": tok.name, "image_size": tok.image_size, "stride": tok.stride, "channels": tok.channels,
            "vocab_size": tok.vocab_size, "ckpt": os.path.basename(tok.ckpt) if tok.ckpt else None}


def summary_path(beton: str) -> str:
    return beton + ".json"


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def write_summary(beton: str, summary: Dict[str, Any]) -> str:
    path = summary_path(beton)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=1)
    os.replace(tmp, path)
    return path


def read_summary(beton: str) -> Dict[str, Any]:
    path = summary_path(beton)
    if not os.path.isfile(path):
        raise BetonError(f"beton '{beton}' has no summary '{path}': it was not written by tools/pretokenize.py "
                         f"or its writing did not finish. Re-run tools/pretokenize.py (with --force to overwrite).")
    try:
        with open(path) as fh:
            summary = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise BetonError(f"summary '{path}' of beton '{beton}' is unreadable ({e}); re-run tools/pretokenize.py "
                         f"--force.") from None
    if summary.get("format_version") != FORMAT_VERSION:
        raise BetonError(f"summary '{path}' has format_version={summary.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}; re-run tools/pretokenize.py --force.")
    return summary


def open_reader(beton: str):
    """An ffcv Reader, or a BetonError saying what is wrong with the file."""
    ensure_ffcv_patched()
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    if not os.path.exists(beton):
        raise BetonError(f"beton '{beton}' does not exist. Write it with tools/pretokenize.py, or set "
                         f"data.path=digits for the embedded dataset.")
    if not os.path.isfile(beton):
        raise BetonError(f"beton '{beton}' is not a regular file.")
    size = os.path.getsize(beton)
    if size == 0:
        raise BetonError(f"beton '{beton}' is empty (0 bytes); its writing was interrupted. Re-run "
                         f"tools/pretokenize.py --force.")
    if size < HeaderType.itemsize:
        raise BetonError(f"beton '{beton}' is truncated ({size} bytes, smaller than an FFCV header).")
    try:
        reader = Reader(beton)
        if len(reader.alloc_table) and int(np.max(reader.alloc_table["ptr"] + reader.alloc_table["size"])) > size:
            raise ValueError("allocation table points past the end of the file")
    except BetonError:
        raise
    except Exception as e:  # noqa: BLE001 - ffcv raises assorted errors on garbage
        raise BetonError(f"beton '{beton}' is corrupt or truncated ({type(e).__name__}: {e}). Re-run "
                         f"tools/pretokenize.py --force.") from None
    return reader


def field_layouts(reader) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    ensure_ffcv_patched()
    from ffcv.fields import NDArrayField

    return {name: (tuple(int(s) for s in h.shape), np.dtype(h.dtype)) for name, h in reader.handlers.items()
            if isinstance(h, NDArrayField)}


def verify_beton(beton: str, tok: Optional[TokenizerConfig] = None, full_checksum: Optional[bool] = None
                 ) -> Dict[str, Any]:
    """Check a beton end to end and return its summary.

    Always: the file opens, its size and sample count equal the summary's. With ``tok``: tokenizer
    name, stored shape and dtype equal what the config expects. ``full_checksum`` (default: for
    files up to 1 GiB) re-hashes the file against the summary's sha256.
    """
    reader = open_reader(beton)
    summary = read_summary(beton)
    size = os.path.getsize(beton)
    if size != summary.get("file_size"):
        raise BetonError(f"beton '{beton}' has {size} bytes but its summary records {summary.get('file_size')}: "
                         f"the file is truncated or was replaced. Re-run tools/pretokenize.py --force.")
    if int(reader.num_samples) != summary.get("count"):
        raise BetonError(f"beton '{beton}' holds {reader.num_samples} samples, its summary says {summary.get('count')}.")
    if full_checksum is None:
        full_checksum = size <= FULL_CHECKSUM_MAX_BYTES
    if full_checksum and sha256_file(beton) != summary.get("sha256"):
        raise BetonError(f"beton '{beton}' is corrupt: its sha256 differs from the one recorded in "
                         f"{summary_path(beton)}. Re-run tools/pretokenize.py --force.")
    if tok is not None:
        check_matches_config(beton, reader, summary, tok)
    return summary


def check_matches_config(beton: str, reader, summary: Dict[str, Any], tok: TokenizerConfig) -> None:
    stored = summary.get("tokenizer", {})
    if stored.get("name") != tok.name:
        raise BetonError(f"beton '{beton}' was written with tokenizer '{stored.get('name')}' but the config uses "
                         f"tokenizer.name={tok.name}. Point data.path at a beton for {tok.name} or change "
                         f"tokenizer.name.")
    # the same grid can come from another image size (e.g. 128 px at stride 8 vs 256 px at stride 16)
    relevant = ("image_size", "stride") + (("vocab_size",) if tok.is_discrete else ("channels",))
    mine = tokenizer_record(tok)
    diffs = [f"tokenizer.{k}: beton {stored[k]}, config {mine[k]}" for k in relevant
             if k in stored and stored[k] != mine[k]]
    if diffs:
        raise BetonError(f"beton '{beton}' was written with other tokenizer settings than the config: "
                         + "; ".join(diffs) + ". Set these tokenizer.* fields to the beton's values, or re-run "
                         "tools/pretokenize.py with this config.")
    present = set(reader.handlers)
    missing = [f for f in (*view_fields(tok.is_discrete), LABEL, INDEX) if f not in present]
    if missing:
        raise BetonError(f"beton '{beton}' lacks the field(s) {missing} (it has {sorted(present)}); the loader "
                         f"needs {[*view_fields(tok.is_discrete), LABEL, INDEX]}. It was not written by this "
                         f"version of tools/pretokenize.py: re-run it (with --force).")
    shape, dtype = expected_layout(tok)
    layouts = field_layouts(reader)
    for name in view_fields(tok.is_discrete):
        if name not in layouts:
            raise BetonError(f"beton '{beton}' has no field '{name}' (fields: {sorted(layouts)}); a "
                             f"{'discrete' if tok.is_discrete else 'continuous'} tokenizer needs "
                             f"{view_fields(tok.is_discrete)}.")
        got_shape, got_dtype = layouts[name]
        if got_shape != shape or got_dtype != dtype:
            raise BetonError(f"beton '{beton}' field '{name}' is {got_dtype}{list(got_shape)} but the config "
                             f"(tokenizer {tok.name}, image_size={tok.image_size}, stride={tok.stride}, "
                             f"channels={tok.channels}, vocab_size={tok.vocab_size}) expects {dtype}{list(shape)}. "
                             f"Fix the tokenizer.* fields or re-run tools/pretokenize.py with this config.")
    if tok.is_discrete and stored.get("vocab_size", tok.vocab_size) > tok.vocab_size:
        raise BetonError(f"beton '{beton}' holds codes of a vocabulary of {stored.get('vocab_size')} but "
                         f"tokenizer.vocab_size={tok.vocab_size}.")
