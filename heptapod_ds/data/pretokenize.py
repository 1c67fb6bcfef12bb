"""Images -> tokenizer -> FFCV beton, sharded over ranks, resumable, verified.

Steps (each rank runs the same function):

1. rank 0 takes the output lock (:mod:`.locking`), refuses an existing output unless ``force``,
   and writes ``FILE.beton.shards/manifest.json`` (source fingerprint, tokenizer, shard size). A
   manifest that disagrees with this job is an error (resuming someone else's work would mix data).
2. The source is cut into fixed-size shards (independent of the number of ranks, so a resumed job
   may use a different world size). Rank r encodes shards r, r+W, ... : each image and its
   horizontal flip, both views stored. A shard is written to a temporary folder and renamed when
   complete, so finished shards are skipped on resume and half-written ones are redone.
   Images that fail to decode are skipped and listed in the shard's report.
3. rank 0 merges the shards in order into the beton (rows sorted by source index), checks the
   sample count it wrote, writes the summary JSON (with sha256) and removes the shards.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..config.schema import TokenizerConfig
from ..tokenizers.base import Tokenizer
from .format import (FORMAT_VERSION, INDEX, LABEL, SOURCE_INDEX, BetonError, field_layouts, open_reader,
                     sha256_file, summary_path, tokenizer_record, view_fields, write_summary)
from .locking import OutputLock
from .sources import ImageDecodeError
from .ffcv_compat import ensure_patched as ensure_ffcv_patched

log = logging.getLogger(__name__)


@dataclass
class PretokenizeOptions:
    batch_size: int = 64          # images per encoder call (each call also encodes their flips)
    shard_size: int = 10000       # images per resumable shard
    decode_workers: int = 4       # threads decoding/cropping images
    write_workers: int = 2        # FFCV writer processes
    force: bool = False           # overwrite an existing output / restart from scratch
    keep_shards: bool = False     # keep the shard folder after a successful merge
    progress: bool = True
    device: Optional[str] = None  # None: cuda:<local rank> when available, else cpu


class Coordinator:
    """Barriers and rank-0 -> all broadcasts over torch.distributed when initialized; no-ops alone."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_torch(cls) -> "Coordinator":
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()


def shard_dir(output: str) -> str:
    return output + ".shards"


def _shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def pretokenize(source, tokenizer: Tokenizer, tok_cfg: TokenizerConfig, output: str,
                opts: Optional[PretokenizeOptions] = None, coord: Optional[Coordinator] = None,
                take_lock: bool = True) -> Optional[Dict[str, Any]]:
    """Write ``output`` (.beton) from ``source``; returns the summary on rank 0, None elsewhere.

    ``take_lock=False`` when the caller already holds the output lock (the digits cache does).
    """
    opts = opts or PretokenizeOptions()
    coord = coord or Coordinator()
    output = os.path.abspath(output)
    lock = OutputLock(output) if (take_lock and coord.rank == 0) else None
    error = None
    if coord.rank == 0:
        try:
            if mp.current_process().daemon:
                raise RuntimeError("writing a beton needs FFCV's writer processes, and this is a daemonic process, "
                                   "which may not start any. Build the dataset first from a normal process "
                                   "(python tools/pretokenize.py ..., or one train.py run), then start the workers.")
            if lock is not None:
                lock.acquire()
            _prepare_output(source, tok_cfg, output, opts)
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            error = e
    failure = coord.broadcast(None if error is None else f"{type(error).__name__}: {error}")
    try:
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"rank 0 refused the job: {failure}")
        _encode_my_shards(source, tokenizer, output, opts, coord)
        coord.barrier()
        if coord.rank != 0:
            return None
        return _merge(source, tok_cfg, tokenizer, output, opts)
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------- step 1

def _manifest(source, tok_cfg: TokenizerConfig, opts: PretokenizeOptions) -> Dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "source": source.fingerprint(), "tokenizer": tokenizer_record(tok_cfg),
            "shard_size": opts.shard_size, "count": len(source)}


def _prepare_output(source, tok_cfg: TokenizerConfig, output: str, opts: PretokenizeOptions) -> None:
    if os.path.isdir(output):
        raise IsADirectoryError(f"--output '{output}' is a directory; give a file name such as {output}/train.beton.")
    if not output.endswith(".beton"):
        raise ValueError(f"--output '{output}' must end with .beton.")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    shards = shard_dir(output)
    if os.path.exists(output) or os.path.exists(summary_path(output)):
        if not opts.force:
            raise FileExistsError(f"output '{output}' already exists; pass --force to overwrite it.")
    if opts.force:
        for path in (output, summary_path(output)):
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(shards, ignore_errors=True)
    manifest = _manifest(source, tok_cfg, opts)
    manifest_path = os.path.join(shards, "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as fh:
            previous = json.load(fh)
        if previous != manifest:
            raise RuntimeError(f"'{shards}' holds shards of a different job (manifest {previous}); pass --force to "
                               f"discard them and start over.")
        log.info("resuming: %s holds shards of this job", shards)
    else:
        os.makedirs(shards, exist_ok=True)
        with open(manifest_path + ".tmp", "w") as fh:
            json.dump(manifest, fh, indent=1)
        os.replace(manifest_path + ".tmp", manifest_path)


# --------------------------------------------------------------------------- step 2

def _pick_device(opts: PretokenizeOptions) -> torch.device:
    if opts.device:
        return torch.device(opts.device)
    if torch.cuda.is_available():  # srun sets SLURM_LOCALID, not LOCAL_RANK
        from ..distributed.launch_env import env_local_rank

        return torch.device("cuda", env_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def _load_safe(source, index: int):
    try:
        return source.load(index), None
    except ImageDecodeError as e:
        return None, str(e)


def _encode_my_shards(source, tokenizer: Tokenizer, output: str, opts: PretokenizeOptions, coord: Coordinator):
    n = len(source)
    num_shards = (n + opts.shard_size - 1) // opts.shard_size
    mine = list(range(coord.rank, num_shards, coord.world_size))
    todo = [k for k in mine if not os.path.isdir(os.path.join(shard_dir(output), _shard_name(k)))]
    if len(todo) < len(mine):
        log.info("rank %d: %d of its %d shards are already done; skipping them", coord.rank, len(mine) - len(todo),
                 len(mine))
    if not todo:
        return
    device = _pick_device(opts)
    tokenizer.to(device)
    total = sum(min(opts.shard_size, n - k * opts.shard_size) for k in todo)
    bar = None
    if opts.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"encode rank {coord.rank}", unit="img", smoothing=0.05,
                   position=coord.rank if coord.world_size <= 8 else None, leave=coord.rank == 0)
    with cf.ThreadPoolExecutor(max(1, opts.decode_workers)) as pool:
        for k in todo:
            _encode_shard(source, tokenizer, output, k, opts, pool, device, bar)
    if bar is not None:
        bar.close()


def _encode_shard(source, tokenizer: Tokenizer, output: str, k: int, opts: PretokenizeOptions, pool, device, bar):
    start, stop = k * opts.shard_size, min(len(source), (k + 1) * opts.shard_size)
    views: List[np.ndarray] = []
    labels: List[int] = []
    kept: List[int] = []
    skipped: List[Dict[str, Any]] = []
    for b0 in range(start, stop, opts.batch_size):
        idx = list(range(b0, min(stop, b0 + opts.batch_size)))
        images = []
        for i, (img, err) in zip(idx, pool.map(lambda j: _load_safe(source, j), idx)):
            if img is None:
                skipped.append({"source_index": i, "path": source.name(i), "error": err})
                log.warning("skipping %s: %s", source.name(i), err)
                continue
            images.append(img)
            labels.append(source.label(i))
            kept.append(i)
        if images:
            x = torch.stack(images).to(device)
            stored = tokenizer.encode(torch.cat([x, torch.flip(x, dims=[-1])]))
            stored = stored.cpu().numpy().astype(tokenizer.stored_dtype, copy=False)
            views.append(np.stack([stored[: len(images)], stored[len(images):]], axis=1))
        if bar is not None:
            bar.update(len(idx))
    final = os.path.join(shard_dir(output), _shard_name(k))
    tmp = final + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shape = (0, 2) + tuple(tokenizer.stored_shape)
    np.save(os.path.join(tmp, "views.npy"), np.concatenate(views) if views else
            np.zeros(shape, dtype=tokenizer.stored_dtype))
    np.save(os.path.join(tmp, "labels.npy"), np.asarray(labels, dtype=np.int64))
    np.save(os.path.join(tmp, "source_index.npy"), np.asarray(kept, dtype=np.int64))
    with open(os.path.join(tmp, "report.json"), "w") as fh:
        json.dump({"start": start, "stop": stop, "written": len(kept), "skipped": skipped}, fh)
    os.replace(tmp, final)


# --------------------------------------------------------------------------- step 3

class _ShardRows:
    """The shards as one indexable dataset of FFCV rows (opened lazily, inside each writer process)."""

    def __init__(self, shard_paths: List[str], counts: List[int]):
        self.paths = shard_paths
        self.offsets = np.cumsum([0] + counts)
        self._views: Dict[int, Any] = {}
        self._meta: Dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if s not in self._views:
            self._views[s] = np.load(os.path.join(self.paths[s], "views.npy"), mmap_mode="r")
            self._meta[s] = (np.load(os.path.join(self.paths[s], "labels.npy")),
                             np.load(os.path.join(self.paths[s], "source_index.npy")))
        j = i - int(self.offsets[s])
        labels, src = self._meta[s]
        both = np.ascontiguousarray(self._views[s][j])
        return both[0], both[1], int(labels[j]), int(i), int(src[j])


def _merge(source, tok_cfg: TokenizerConfig, tokenizer: Tokenizer, output: str, opts: PretokenizeOptions):
    ensure_ffcv_patched()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    n = len(source)
    num_shards = (n + opts.shard_size - 1) // opts.shard_size
    paths = [os.path.join(shard_dir(output), _shard_name(k)) for k in range(num_shards)]
    missing = [p for p in paths if not os.path.isdir(p)]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) are missing after encoding (first: {missing[0]}); re-run the "
                           f"same command to resume.")
    reports = []
    for p in paths:
        with open(os.path.join(p, "report.json")) as fh:
            reports.append(json.load(fh))
    counts = [r["written"] for r in reports]
    skipped = [s for r in reports for s in r["skipped"]]
    rows = _ShardRows(paths, counts)
    if len(rows) == 0:
        raise RuntimeError(f"none of the {n} images could be decoded (first error: {skipped[0]['error']}); "
                           f"nothing to write.")
    dtype, shape = np.dtype(tokenizer.stored_dtype), tuple(tokenizer.stored_shape)
    names = view_fields(tokenizer.is_discrete)
    fields = {names[0]: NDArrayField(dtype=dtype, shape=shape), names[1]: NDArrayField(dtype=dtype, shape=shape),
              LABEL: IntField(), INDEX: IntField(), SOURCE_INDEX: IntField()}
    tmp = output + ".tmp"
    t0 = time.perf_counter()
    DatasetWriter(tmp, fields, num_workers=max(1, opts.write_workers)).from_indexed_dataset(rows, chunksize=256)
    reader = open_reader(tmp)
    if int(reader.num_samples) != len(rows):
        raise BetonError(f"wrote {reader.num_samples} samples to {tmp} but expected {len(rows)}; the file is left "
                         f"for inspection.")
    layouts = field_layouts(reader)
    if layouts[names[0]] != (shape, dtype):
        raise BetonError(f"{tmp}: field {names[0]} reads back as {layouts[names[0]]}, expected {(shape, dtype)}.")
    os.replace(tmp, output)
    summary = {
        "format_version": FORMAT_VERSION,
        "count": len(rows),
        "source_count": n,
        "skipped_count": len(skipped),
        "skipped": skipped,
        "classes": len(source.classes),
        "class_names": list(source.classes),
        "fields": {k: {"shape": list(shape), "dtype": dtype.name} for k in names},
        "shape": list(shape),
        "dtype": dtype.name,
        "tokenizer": tokenizer_record(tok_cfg),
        "scale_factor": tok_cfg.scale_factor,
        "source": source.fingerprint(),
        "file_size": os.path.getsize(output),
        "sha256": sha256_file(output),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_summary(output, summary)
    if not opts.keep_shards:
        shutil.rmtree(shard_dir(output), ignore_errors=True)
    log.info("wrote %s: %d samples (%d skipped) in %.1fs of merging", output, len(rows), len(skipped),
             time.perf_counter() - t0)
    return summary
