"""``python tools/convert_ckpt.py``: releases, resharding, inspection and verification of checkpoints.

    to-release   --ckpt RUN_OR_CKPT_DIR --out DIR [--weights ema|raw] [--dtype fp32|bf16]
    reshard      --ckpt RUN_OR_CKPT_DIR --out RUN_DIR --tensor N --pipeline N --dp N --zero N
    from-release --release DIR --out RUN_DIR --tensor N --pipeline N --dp N --zero N
    inspect      PATH
    verify       PATH

Every command reads files with safetensors or ``torch.load(weights_only=True)``, writes into a
staging folder renamed into place at the end, and refuses an existing output unless ``--force``.
Exit status: 0 done, 1 a damaged or unusable input (the message names the file), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from .progress import _bar, _peak_rss_mib, start_peak_sampler

log = logging.getLogger("convert_ckpt")


# --------------------------------------------------------------------------- helpers

def _module_counts(names_numels) -> "OrderedDict[str, int]":
    """Parameter count per module (two name levels, e.g. ``backbone.decoder``) and per top-level module."""
    out: "OrderedDict[str, int]" = OrderedDict()
    for name, n in names_numels:
        parts = name.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                key = ".".join(parts[:depth])
                out[key] = out.get(key, 0) + n
    return out


# --------------------------------------------------------------------------- commands

def cmd_to_release(args) -> int:
    from .output import check_free, staged_dir
    from .reader import TrainingCheckpoint
    from .release import write_release
    from .world import ensure_local_world

    check_free(args.out, args.force)
    t0 = time.perf_counter()
    ensure_local_world()
    src = TrainingCheckpoint(args.ckpt)
    weights = args.weights
    if weights == "auto":
        weights = "ema" if src.has_ema else "raw"
    log.info("to-release: %s (step %d, layout %s) -> %s, %s weights, %s", src.dir, src.step, src.layout(),
             args.out, weights, args.dtype)
    with _bar(src.tp, f"read {weights} weights") as bar:
        tensors = src.tensors("ema" if weights == "ema" else "fp32", progress=bar.update)
    source = {"path": str(src.dir.resolve()), "step": src.step, "layout": src.layout(),
              "ds_version": src.meta.get("ds_version")}
    with staged_dir(args.out, args.force) as tmp:
        write_release(tmp, tensors, src.cfg, source=source, weights=weights, dtype=args.dtype,
                      extra={"ema": src.ema_counters() if weights == "ema" else None})
    log.info("wrote release %s (%d tensors, %.3fM parameters) in %.1fs, peak RSS %s", args.out,
             len(tensors), sum(t.numel() for t in tensors.values()) / 1e6, time.perf_counter() - t0,
             _peak_rss_mib())
    return 0


def _inspect_release(path: pathlib.Path) -> Dict[str, Any]:
    from safetensors import safe_open

    from .release import RELEASE_FILE, WEIGHTS_FILE, load_release_config

    cfg = load_release_config(path)
    rel = json.loads((path / RELEASE_FILE).read_text()) if (path / RELEASE_FILE).is_file() else {}
    shapes, dtypes = {}, {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as fh:
        for k in fh.keys():
            sl = fh.get_slice(k)
            shapes[k] = sl.get_shape()
            dtypes[sl.get_dtype()] = dtypes.get(sl.get_dtype(), 0) + 1
    numels = [(k, _numel(s)) for k, s in shapes.items()]
    return {"kind": "release", "path": str(path), "preset": cfg.preset,
            "step": rel.get("source", {}).get("step"),
            "source_layout": rel.get("source", {}).get("layout"), "weights": rel.get("weights"),
            "dtype": rel.get("dtype"), "tensor_dtypes": dtypes, "num_parameters": sum(n for _, n in numels),
            "parameters_per_module": _module_counts(numels),
            "bytes": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _inspect_training(path) -> Dict[str, Any]:
    import torch

    from .reader import TrainingCheckpoint
    from .world import ensure_local_world

    ensure_local_world()
    src = TrainingCheckpoint(path)
    module = src.model_states()["module"]
    dtypes: Dict[str, int] = {}
    for v in module.values():
        if torch.is_tensor(v):
            dtypes[str(v.dtype)] = dtypes.get(str(v.dtype), 0) + 1
    numels = [(s.name, s.numel) for s in src.specs]
    sizes = src.nbytes_by_file()
    return {"kind": "training checkpoint", "path": str(src.dir), "preset": src.cfg.preset, "step": src.step,
            "layout": src.layout(), "world_size": src.world_size, "ema": src.has_ema,
            "ema_state": src.ema_counters(), "optimizer_step": src.optimizer_step(),
            "module_dtypes (TP rank 0)": dtypes, "precision": src.cfg.parallel.precision,
            "num_parameters": sum(n for _, n in numels), "parameters_per_module": _module_counts(numels),
            "total_bytes": sum(sizes.values()), "files": len(sizes), "bytes": sizes}


def cmd_inspect(args) -> int:
    from .release import is_release

    path = pathlib.Path(args.path)
    info = _inspect_release(path) if is_release(path) else _inspect_training(path)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    for key, value in info.items():
        if isinstance(value, dict) and key in ("parameters_per_module", "bytes"):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<48} {v:>14,}")
        else:
            print(f"{key}: {value}")
    return 0


def verify_path(path) -> List[str]:
    """Problems of a release or a training checkpoint (empty = intact)."""
    from .release import is_release, verify_release

    path = pathlib.Path(path)
    if is_release(path):
        return verify_release(path)
    return verify_training(path)


def verify_training(path) -> List[str]:
    """The recorded hashes (``engine.integrity``, when present) plus: every file the layout implies is
    there and loads safely."""
    from heptapod_ds.engine import safe_load

    from .reader import CheckpointFormatError, TrainingCheckpoint, resolve_tag_dir
    from .world import ensure_local_world

    tag_dir = resolve_tag_dir(path)
    problems: List[str] = []
    try:
        from heptapod_ds.engine.integrity import verify_checkpoint
    except ImportError:
        verify_checkpoint = None
    if verify_checkpoint is not None:
        problems += list(verify_checkpoint(tag_dir))
    ensure_local_world()
    try:
        src = TrainingCheckpoint(tag_dir)
    except (CheckpointFormatError, ValueError, OSError) as e:
        return problems + [str(e)]
    files = src.expected_files()
    with _bar(len(files), "verify") as bar:
        for f in files:
            try:
                safe_load.load(f, allow_deepspeed=True, mmap=True)
            except (safe_load.CorruptCheckpointError, safe_load.UnsafeCheckpointError,
                    FileNotFoundError) as e:
                msg = str(e)
                if not any(str(f) in p for p in problems):
                    problems.append(msg)
            bar.update(1)
    return problems


def cmd_verify(args) -> int:
    problems = verify_path(args.path)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"{args.path}: OK")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/convert_ckpt.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("to-release", help="training checkpoint -> release folder (model.safetensors, "
                                          "config.json, "
                                          "release.json)",
                       description="Consolidate a training checkpoint of any layout (ZeRO 0-3, any DP/TP) "
                                   "into a "
                                   "release folder with canonical parameter names.")
    p.add_argument("--ckpt", required=True, help="run directory, its checkpoints/ folder, or a global_stepN "
                                                 "folder "
                                                 "(the newest complete checkpoint is taken)")
    p.add_argument("--out", required=True, help="release folder to write")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="ema: the EMA weights; raw: the fp32 master weights; auto (default): ema when the "
                        "checkpoint has one")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of model.safetensors")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_to_release)

    p = sub.add_parser("inspect", help="step, layout, parameters per module, dtypes, bytes, EMA",
                       description="Describe a training checkpoint or a release folder.")
    p.add_argument("path", help="run directory, checkpoints/ folder, global_stepN folder or release folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check every file against its recorded hash / layout",
                       description="Check a release (sha256 of release.json) or a training checkpoint "
                                   "(hashes "
                                   "of heptapod_meta.json when recorded; every shard present and readable). "
                                   "Exit status 1 names each missing, truncated or altered file.")
    p.add_argument("path", help="release folder, run directory, checkpoints/ folder or global_stepN folder")
    p.set_defaults(func=cmd_verify)
    _add_writers(sub)
    return parser


def _add_writers(sub) -> None:
    """reshard / from-release (see :mod:`.writer`)."""
    try:
        from .writer_cli import add_parsers
    except ImportError:
        return
    add_parsers(sub)


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    start_peak_sampler()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from heptapod_ds.engine.safe_load import CorruptCheckpointError, UnsafeCheckpointError

    from .output import OutputExistsError
    from .reader import CheckpointFormatError
    from .release import ReleaseError

    try:
        return int(args.func(args) or 0)
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointFormatError, ReleaseError, CorruptCheckpointError, UnsafeCheckpointError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
