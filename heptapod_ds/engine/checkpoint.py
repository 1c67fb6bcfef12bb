"""Atomic DeepSpeed checkpoints with EMA, RNG states, trainer state and the resolved config.

Layout under ``{run_dir}/checkpoints``::

    global_step{N}/                    one complete checkpoint (DeepSpeed's files + ours)
        mp_rank_*/zero_pp_rank_*       DeepSpeed: model, optimizer, LR scheduler (in pp_stageKK/ with PP>1)
        heptapod_rank{R:05d}.pt        per global rank: RNG states, the trainer's client_state, EMA piece
        heptapod_meta.json             step, resolved config, parallel layout, size + SHA-256 of
                                       every other file (written last)
    latest                             DeepSpeed-compatible pointer to the newest complete tag
    global_step{N}.damaged-{time}/     a checkpoint that failed verification, moved aside (kept)

Atomicity: every rank writes into ``.staging-global_step{N}/global_step{N}``; after a barrier,
rank 0 writes the meta file and renames the tag directory into place (one ``rename``, atomic on
POSIX), then rewrites ``latest`` through a temporary file. A crash at any point leaves either
the old set of checkpoints or the new one; stale ``.staging-*`` directories are removed on the next
start. Old checkpoints are first renamed to ``.trash-*`` and then deleted, so a crash while
pruning never leaves a half-deleted directory that looks complete. ``resume=auto`` scans for the
newest ``global_step*`` with a meta file instead of trusting ``latest``.

Integrity (:mod:`heptapod_ds.engine.integrity`): each rank hashes the files it wrote itself (its
``heptapod_rank`` file and its ZeRO shards) while slower ranks still write; the rest (the per-TP-rank
module files) is split over all ranks by size; rank 0 gathers the digests into the meta file. Before a
resume every rank checks its share of the files against the meta file. ``resume=auto`` moves a damaged
checkpoint aside (``global_stepN.damaged-*``, never deleted), names each bad file, and falls back to
the newest checkpoint that verifies; an explicit ``resume=PATH`` that does not verify is an error.
A save that fails on any rank (disk full, quota, I/O error) removes its staging directory on every
rank's word and raises :class:`CheckpointWriteError`; the checkpoints already there stay as they were.

The EMA is saved by every rank under ZeRO-3 (each holds a partition) and by data-parallel rank 0
of each TP/PP group otherwise. RNG states and the trainer's client_state are saved per rank.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import random
import re
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from heptapod_ds.config.loader import to_dict
from heptapod_ds.distributed import parallel_state

from . import integrity
from .faults import fault_point
from .integrity import CheckpointCorrupt
from .safe_load import load_rank_file, safe_deepspeed_loads

log = logging.getLogger(__name__)

META = "heptapod_meta.json"
TAG_RE = re.compile(r"^global_step(\d+)$")

# Fields that change what the weights mean or how they are laid out; a difference refuses a resume.
IDENTITY_FIELDS = (
    ["preset"]
    + [f"tokenizer.{k}" for k in ("name", "image_size", "stride", "channels", "vocab_size", "scale_factor")]
    + [f"backbone.{k}" for k in ("depth", "width", "num_heads", "mlp_ratio", "pos_embed", "num_classes")]
    + [f"head.{k}" for k in ("type", "depth", "width", "num_heads", "mlp_ratio", "pos_embed")]
    + [f"diffusion.{k}" for k in ("depth", "width")]
)
# Identity fields added after checkpoints were written without them: the value those checkpoints had.
FIELDS_ADDED_LATER = {"head.pos_embed": "learned"}
LAYOUT_FIELDS = ("tensor", "pipeline", "dp", "zero_stage", "pipeline_split")


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be resumed by this run; the message names every difference."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); older checkpoints are intact."""


def _get(d: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d if d != {} else FIELDS_ADDED_LATER.get(dotted)


def rng_state() -> Dict[str, Any]:
    """Every RNG this rank draws from: python, numpy, torch CPU, CUDA, megatron's TP tracker.

    Stored as tensors and plain python values only, so the file loads with ``weights_only=True``
    (NumPy's state holds an ndarray, which a safe unpickler refuses).
    """
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": _this_device_rng_state(),
            "megatron": get_cuda_rng_tracker().get_states()}


def _this_device_rng_state():
    """The RNG state of the GPU this rank trains on (one tensor), or None without CUDA.

    Only this rank's device: every other visible GPU belongs to another rank, and a job that resumes on
    nodes exposing fewer GPUs per task (one per task under Slurm's ``--gpus-per-task``) must still load it."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_rng_state(torch.cuda.current_device())


def _restore_device_rng(saved) -> None:
    """Restore what :func:`_this_device_rng_state` saved onto this rank's GPU. Older checkpoints hold a list
    of every visible GPU's state: the entry of this rank's device when it exists, else the first (the
    states were seeded alike), so a task that sees fewer GPUs than the saving one still resumes."""
    if saved is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(saved, (list, tuple)):
        if not saved:
            return
        saved = saved[device] if device < len(saved) else saved[0]
    torch.cuda.set_rng_state(saved, device)


def set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    _restore_device_rng(state["cuda"])
    if state.get("megatron") is not None:  # None: a TP rank a converted checkpoint had no state for
        get_cuda_rng_tracker().set_states(state["megatron"])


def _layout(cfg) -> Dict[str, Any]:
    """The parallel layout a checkpoint is saved in; ``pipeline_split`` (layers per stage, None at PP=1)
    tells which full-model parameters each ``pp_stageKK`` folder holds (see heptapod_ds.pipeline.stage)."""
    info = parallel_state.get_info()
    split = None
    if info.pp_size > 1:
        from heptapod_ds.pipeline import split_model
        split = split_model(cfg).counts
    return {"tensor": info.tp_size, "pipeline": info.pp_size, "dp": info.dp_size,
            "zero_stage": cfg.parallel.zero_stage, "pipeline_split": split}


def _engine_tag(tag: str, info) -> str:
    """DeepSpeed's tag for this rank: with pipeline parallelism each stage has its own engine, and all
    stages would write the same ``mp_rank_XX_model_states.pt`` (XX = TP rank), so each gets a subfolder."""
    return tag if info.pp_size == 1 else f"{tag}/pp_stage{info.pp_rank:02d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj) -> List[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree_on_error(error: Optional[str]) -> Optional[str]:
    """Every rank's error joined (``None`` when no rank failed), the same on all ranks."""
    errors = [e for e in _all_gather(error) if e]
    return "; ".join(errors) if errors else None


def _written_by(tag_dir: pathlib.Path, tag: str, info) -> List[str]:
    """Files of ``tag_dir`` that this rank wrote itself (its rank file and its own ZeRO shards).

    Only names that DeepSpeed gives one rank alone are claimed; everything else is hashed after the
    barrier, so a file still being written by another rank is never hashed."""
    sub = _engine_tag(tag, info)[len(tag):].lstrip("/")
    shard = re.compile(rf"^(bf16_)?zero_pp_rank_{info.dp_rank}_mp_rank_{info.tp_rank:02d}_(model|optim)_states\.pt$")
    mine = [f"heptapod_rank{info.rank:05d}.pt"]
    folder = tag_dir / sub if sub else tag_dir
    if folder.is_dir():
        mine += [f"{sub}/{n}" if sub else n for n in sorted(os.listdir(folder)) if shard.match(n)]
    return [m for m in mine if (tag_dir / m).is_file()]


def _gather_file_records(tag_dir: pathlib.Path, own: Dict[str, Dict[str, Any]], info
                         ) -> Optional[Dict[str, Dict[str, Any]]]:
    """Size + digest of every file of ``tag_dir`` on rank 0 (``None`` elsewhere); collective.

    Each rank brings the records of its own files; rank 0 lists the directory, splits the files no
    one claimed over all ranks by size, and every rank hashes its part."""
    claimed = _all_gather(own)
    known: Dict[str, Dict[str, Any]] = {}
    for part in claimed:
        known.update(part)
    plan = None
    if info.rank == 0:
        rest = {rel: (tag_dir / rel).stat().st_size for rel in integrity.list_files(tag_dir) if rel not in known}
        plan = integrity.balance(rest, info.world_size)
    plan = _broadcast(plan)
    extra = integrity.describe_files(tag_dir, plan[info.rank], threads=4)
    for part in _all_gather(extra):
        known.update(part)
    return dict(sorted(known.items())) if info.rank == 0 else None


class CheckpointManager:
    """Save / find / load checkpoints of one run (``{cfg.run_dir}/checkpoints``)."""

    def __init__(self, cfg):
        if cfg.checkpoint.keep_last <= 0:
            raise ValueError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be positive.")
        self.cfg = cfg
        self.dir = pathlib.Path(cfg.run_dir) / "checkpoints"
        self.last_save_seconds: Optional[float] = None
        self.last_load_seconds: Optional[float] = None
        self.loaded_tag: Optional[pathlib.Path] = None

    # ------------------------------------------------------------------ discovery

    def complete_checkpoints(self, root: Optional[pathlib.Path] = None) -> List[pathlib.Path]:
        """Complete checkpoint directories under ``root`` (default: this run's), oldest first."""
        root = pathlib.Path(root or self.dir)
        if not root.is_dir():
            return []
        found = []
        for child in root.iterdir():
            m = TAG_RE.match(child.name)
            if m and (child / META).is_file():
                found.append((int(m.group(1)), child))
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[pathlib.Path]:
        ckpts = self.complete_checkpoints()
        return ckpts[-1] if ckpts else None

    def _resume_target(self) -> Optional[pathlib.Path]:
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return None
        if mode == "auto":
            return self.latest()
        path = pathlib.Path(mode)
        if (path / META).is_file():
            return path
        if path.is_dir():
            inside = self.complete_checkpoints(path / "checkpoints") or self.complete_checkpoints(path)
            if inside:
                return inside[-1]
        raise FileNotFoundError(f"checkpoint.resume='{mode}' is not a complete checkpoint (no {META}) and "
                                f"holds none; pass a global_stepN directory, a checkpoints directory, auto "
                                f"or none.")

    def _verified_target(self) -> Optional[pathlib.Path]:
        """The checkpoint to resume from, verified against its meta file (collective).

        ``auto``: the newest checkpoint that verifies; each newer damaged one is named, file by file,
        and moved aside. An explicit path that does not verify raises :class:`CheckpointCorrupt`."""
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return None
        if mode == "auto":
            candidates = _broadcast([str(p) for p in reversed(self.complete_checkpoints())]
                                    if parallel_state.get_info().rank == 0 else None)
        else:
            candidates = [str(self._resume_target())]
        damaged = []
        for cand in map(pathlib.Path, candidates):
            problems = self.verify(cand)
            if not problems:
                if damaged and parallel_state.is_rank0():
                    log.warning("resuming from %s, the newest checkpoint that verifies", cand)
                    _write_atomic(self.dir / "latest", cand.name)  # it named a checkpoint now moved aside
                return cand
            report = f"checkpoint {cand} is damaged:\n  - " + "\n  - ".join(problems)
            if mode != "auto":
                raise CheckpointCorrupt(report + "\nPass another checkpoint (or checkpoint.resume=auto to take "
                                                 "the newest intact one of this run).")
            damaged.append(cand)
            if parallel_state.is_rank0():
                aside = cand.with_name(f"{cand.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                if aside.exists():
                    aside = aside.with_name(f"{aside.name}-{time.time_ns()}")
                log.error("%s\nmoved aside to %s (kept for inspection); trying the previous checkpoint",
                          report, aside.name)
                os.rename(cand, aside)
            _barrier()
        if damaged:
            raise CheckpointCorrupt(
                f"no checkpoint of {self.dir} verifies ({len(damaged)} damaged, moved aside as *.damaged-*; "
                f"see the errors above). Restore one, or start over with checkpoint.resume=none.")
        return None

    def verify(self, ckpt: pathlib.Path) -> List[str]:
        """Problems of checkpoint ``ckpt`` (``[]`` when intact), each rank checking a share (collective)."""
        hashes = self.cfg.checkpoint.verify == "full"
        info = parallel_state.get_info()
        if info.world_size == 1 or not dist.is_initialized():
            return list(integrity.verify_checkpoint(ckpt, hashes=hashes))
        head = None
        if info.rank == 0:
            try:
                head = ("ok", integrity.read_meta(ckpt).get("files"))
            except CheckpointCorrupt as e:
                head = ("bad", [str(e)])
        status, payload = _broadcast(head)
        if status == "bad":
            return payload
        if payload is None:
            if info.rank == 0:
                log.warning("%s was written without checksums (an older heptapod_ds); loading it unverified", ckpt)
            return []
        share = integrity.balance({rel: rec["size"] for rel, rec in payload.items()}, info.world_size)[info.rank]
        mine = integrity.check_files(ckpt, payload, share, hashes=hashes, threads=4)
        return sorted(str(p) for part in _all_gather([str(p) for p in mine]) for p in part)

    def _clean_stale(self) -> None:
        """Remove leftovers of an interrupted save or prune (rank 0 only)."""
        if not self.dir.is_dir():
            return
        for child in self.dir.iterdir():
            if child.name.startswith((".staging-", ".trash-")):
                shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------ save

    def save(self, engine, step: int, client_state: Optional[Dict[str, Any]] = None,
             ema=None) -> pathlib.Path:
        """Save a complete, checksummed checkpoint of ``step`` atomically; collective over all ranks.

        Raises :class:`CheckpointWriteError` on every rank if any rank failed to write (nothing of the
        new checkpoint is then left; older checkpoints are untouched)."""
        t0 = time.perf_counter()
        info = parallel_state.get_info()
        tag = f"global_step{int(step)}"
        staging = self.dir / f".staging-{tag}"
        tag_dir = staging / tag
        error: Optional[str] = None
        if info.rank == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir()
            except OSError as e:
                error = f"rank 0: {type(e).__name__}: {e}"
        error = _broadcast(error)  # the other ranks must not write into a folder that is not there
        own_files: Dict[str, Dict[str, Any]] = {}
        if ema is not None:
            ema.sync()  # collective, before anything can fail: ZeRO-1/2 ranks follow fragments of the master
        if error is None:
            fault_point("save.begin", step)
            try:
                engine.save_checkpoint(str(staging), tag=_engine_tag(tag, info),
                                       client_state={"heptapod_step": int(step)}, save_latest=False)
                fault_point("save.engine", step)
                own = {"rng": rng_state(), "client_state": client_state or {}, "ema": None, "rank": info.rank}
                if ema is not None and (ema.partitioned or info.dp_rank == 0):
                    own["ema"] = ema.state_dict()
                torch.save(own, tag_dir / f"heptapod_rank{info.rank:05d}.pt")
                fault_point("save.rank_file", step)
                own_files = integrity.describe_files(tag_dir, _written_by(tag_dir, tag, info), threads=4,
                                                     fsync=True)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                error = f"rank {info.rank}: {type(e).__name__}: {e}"
            error = _agree_on_error(error)
        files: Optional[Dict[str, Dict[str, Any]]] = None
        if error is None:
            try:
                files = _gather_file_records(tag_dir, own_files, info)
            except Exception as e:  # noqa: BLE001
                error = f"rank {info.rank}: {type(e).__name__}: {e}"
            error = _agree_on_error(error)
        final = self.dir / tag
        if error is None:
            if info.rank == 0:
                fault_point("save.hashed", step)
                try:
                    self._commit(staging, final, step, files, ema is not None)
                except Exception as e:  # noqa: BLE001
                    error = f"rank 0: {type(e).__name__}: {e}"
            error = _broadcast(error)
        if error is not None:
            if info.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            _barrier()
            newest = self.latest()
            raise CheckpointWriteError(
                f"could not save checkpoint {tag} ({error}); the newest complete checkpoint is {newest or 'none'}. "
                f"Free space (or raise the quota) in {self.dir} and restart: checkpoint.resume=auto resumes from it.")
        _barrier()
        self.last_save_seconds = time.perf_counter() - t0
        log.info("saved checkpoint %s in %.2fs", final, self.last_save_seconds)
        return final

    def _commit(self, staging: pathlib.Path, final: pathlib.Path, step: int,
                files: Dict[str, Dict[str, Any]], has_ema: bool) -> None:
        """Rank 0: write the meta file, move the tag into place, point ``latest`` at it, prune."""
        info = parallel_state.get_info()
        tag = final.name
        meta = integrity.seal_meta({
            "step": int(step), "tag": tag, "time": time.time(), "world_size": info.world_size,
            "layout": _layout(self.cfg), "has_ema": has_ema, "config": to_dict(self.cfg),
            "hash": integrity.HASH, "files": files})
        _write_atomic(staging / tag / META, json.dumps(meta, indent=1))
        fault_point("save.meta", step)
        if final.exists():  # an earlier run wrote the same step: replace it, never mix the two
            trash = self.dir / f".trash-{tag}-{time.time_ns()}"
            os.rename(final, trash)
            shutil.rmtree(trash)
        os.rename(staging / tag, final)
        _fsync_dir(self.dir)
        fault_point("save.renamed", step)
        shutil.rmtree(staging, ignore_errors=True)
        _write_atomic(self.dir / "latest", tag)
        self._prune(step)

    def _prune(self, step: Optional[int] = None) -> None:
        ckpts = self.complete_checkpoints()
        for old in ckpts[:-self.cfg.checkpoint.keep_last]:
            trash = self.dir / f".trash-{old.name}-{time.time_ns()}"
            os.rename(old, trash)
            fault_point("save.prune", step)
            shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def check_compatible(self, meta: Dict[str, Any], where: pathlib.Path) -> None:
        """Refuse a checkpoint of another preset / tokenizer / model shape / parallel layout."""
        saved_cfg = meta["config"]
        mine = to_dict(self.cfg)
        diffs = [f"{k}: checkpoint {_get(saved_cfg, k)!r}, this run {_get(mine, k)!r}"
                 for k in IDENTITY_FIELDS if _get(saved_cfg, k) != _get(mine, k)]
        if diffs:
            raise CheckpointMismatch(
                f"checkpoint {where} was made with another model and cannot be resumed:\n  - "
                + "\n  - ".join(diffs)
                + "\nUse a new run_dir, pass checkpoint.resume=none, or set these fields to the checkpoint's "
                  "values.")
        layout = _layout(self.cfg)
        ldiffs = [f"{k}: checkpoint {meta['layout'].get(k)}, this run {layout[k]}"
                  for k in LAYOUT_FIELDS if meta["layout"].get(k) != layout[k]]
        if ldiffs:
            raise CheckpointMismatch(
                f"checkpoint {where} has another parallel layout:\n  - " + "\n  - ".join(ldiffs)
                + "\nRelaunch with the checkpoint's layout, or convert it first (tools/convert_ckpt.py).")

    def load(self, engine, ema=None) -> Optional[Dict[str, Any]]:
        """Resume per ``checkpoint.resume``; this rank's saved client_state, or None if there is nothing.

        Restores model, optimizer, LR scheduler (DeepSpeed), the EMA (if given) and every RNG state.
        """
        t0 = time.perf_counter()
        info = parallel_state.get_info()
        if info.rank == 0 and self.cfg.checkpoint.resume == "auto":
            self._clean_stale()
        _barrier()
        target = self._verified_target()
        if target is None:
            return None
        meta = integrity.read_meta(target)
        self.check_compatible(meta, target)
        if ema is not None and not meta.get("has_ema", False):
            decay = self.cfg.train.ema_decay
            raise CheckpointMismatch(f"checkpoint {target} has no EMA but this run keeps one "
                                     f"(train.ema_decay={decay}); pass train.ema_decay=0 or start a new "
                                     f"run_dir.")
        with safe_deepspeed_loads(engine):
            load_path, _ = engine.load_checkpoint(str(target.parent), tag=_engine_tag(target.name, info),
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {target}; see the DeepSpeed log above.")
        own = load_rank_file(target / f"heptapod_rank{info.rank:05d}.pt")
        if ema is not None:
            ema_state = own["ema"]
            if ema_state is None:  # replicated EMA: data-parallel rank 0 of this TP/PP group saved it
                owner = dist.get_global_rank(parallel_state.dp_group(), 0) if dist.is_initialized() else 0
                ema_state = load_rank_file(target / f"heptapod_rank{owner:05d}.pt")["ema"]
            ema.load_state_dict(ema_state)
        set_rng_state(own["rng"])
        _barrier()
        self.loaded_tag = target
        self.last_load_seconds = time.perf_counter() - t0
        log.info("resumed from %s (step %d) in %.2fs", target, meta["step"], self.last_load_seconds)
        return own["client_state"]
