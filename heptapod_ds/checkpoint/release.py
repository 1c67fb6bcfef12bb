"""Release folders: the trained weights alone, in a form that needs nothing but this package.

A release folder holds

* ``model.safetensors``: canonical parameter names (independent of TP/PP and of the layer
  implementation), full tensors, fp32 or bf16; the EMA or the raw fp32 master weights.
* ``config.json``: the full resolved config of the run (model, tokenizer, sampling sections and the
  rest), so that :func:`build_model_from_release` rebuilds the model from this file alone.
* ``release.json``: where it came from (step, layout, path), which weights, dtype, and the size and
  sha256 of every other file (checked by :func:`verify_release`).

Loader API (stable; used by tools/sample_fid.py and ``checkpoint.from_release``)::

    cfg, state_dict = load_release(dir)            # HeptapodConfig, {canonical name: tensor}
    model = build_model_from_release(dir)          # eval-mode HeptapodModel of this process's TP rank
    load_release_into(model, dir)                  # into an existing model (any TP, ZeRO-3 partitions)
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from heptapod_ds.data.format import sha256_file

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RELEASE_FILE = "release.json"
FORMAT = "heptapod-release"
FORMAT_VERSION = 1


class ReleaseError(ValueError):
    """A release folder that cannot be used; the message names the file."""


def write_release(out: pathlib.Path, tensors: Dict[str, torch.Tensor], cfg, source: Dict[str, Any],
                  weights: str, dtype: str, extra: Optional[Dict[str, Any]] = None) -> None:
    """Write the three files into ``out`` (an empty staging folder; the caller renames it into place)."""
    from safetensors.torch import save_file

    from heptapod_ds.config.loader import to_dict

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    converted = {k: v.to(torch_dtype).contiguous() for k, v in tensors.items()}
    save_file(converted, str(out / WEIGHTS_FILE),
              metadata={"format": FORMAT, "weights": weights, "dtype": dtype})
    del converted
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": to_dict(cfg)}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str) + "\n")
    files = {name: {"size": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
             for name in (WEIGHTS_FILE, CONFIG_FILE)}
    release = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": time.time(), "source": source,
               "weights": weights, "dtype": dtype,
               "num_parameters": int(sum(t.numel() for t in tensors.values())), "files": files}
    release.update(extra or {})
    (out / RELEASE_FILE).write_text(json.dumps(release, indent=1, default=str) + "\n")


def is_release(path) -> bool:
    path = pathlib.Path(path)
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def verify_release(path) -> List[str]:
    """Problems of a release folder (missing / truncated / altered files); empty when it is intact."""
    path = pathlib.Path(path)
    rel = path / RELEASE_FILE
    if not rel.is_file():
        return [f"{rel} is missing: cannot check the files against their recorded sha256."]
    try:
        files = json.loads(rel.read_text())["files"]
    except (ValueError, KeyError) as e:
        return [f"{rel} is not a release record ({e})."]
    problems = []
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{f} is missing.")
        elif f.stat().st_size != rec["size"]:
            problems.append(f"{f} has {f.stat().st_size} bytes, {rec['size']} recorded (truncated or "
                            f"replaced).")
        elif sha256_file(f) != rec["sha256"]:
            problems.append(f"{f} does not match its recorded sha256 (altered).")
    return problems


def load_release_config(path):
    """The :class:`HeptapodConfig` of a release (validated for one process)."""
    from .names import saved_config

    path = pathlib.Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ReleaseError(f"{cfg_file} is missing: {path} is not a release folder (tools/convert_ckpt.py "
                           f"to-release writes one).")
    try:
        data = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise ReleaseError(f"{cfg_file} is not valid JSON ({e}).") from None
    if data.get("format") != FORMAT:
        raise ReleaseError(f"{cfg_file} is not a {FORMAT} config (format={data.get('format')!r}).")
    cfg = saved_config(data["config"], cfg_file)
    return one_process_config(cfg)


def one_process_config(cfg):
    """``cfg`` validated for one process on any machine: no parallel layout, no DeepSpeed file, and none
    of the files only the training machine had (its start release, its in-training FID inputs)."""
    from heptapod_ds.config.loader import validate

    cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.world_size = 1, 1, 0
    cfg.train.grad_accum = 0
    cfg.parallel.ds_config = None
    cfg.checkpoint.from_release = None
    cfg.eval.fid_every = 0
    return validate(cfg, world_size=1)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class StreamedWeights(Mapping):
    """A release's tensors read one at a time from ``model.safetensors``, as fp32: a conversion holds one
    parameter of it at a time, never the whole file.

    ``safe_open`` checks the file (header, dtypes, offsets inside the file) and gives names and shapes;
    each tensor is then read with ``readinto`` into memory of its own rather than through the file's
    memory map, whose pages would otherwise stay resident (counted in the process's RSS) until the
    whole file had been mapped in. The last tensor read is kept, since a writer asks for the same
    parameter once per TP rank and file in a row."""

    def __init__(self, path: pathlib.Path):
        import struct

        from safetensors import SafetensorError, safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:  # validates the header against the file
                self._names = list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise ReleaseError(f"cannot read {path}: {e} (truncated or not a safetensors file).") from None
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        self._base = 8 + n
        self._entries = {k: header[k] for k in self._names}
        self._last: Tuple[Optional[str], Optional[torch.Tensor]] = (None, None)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise KeyError(name)
        if self._last[0] != name:
            e = self._entries[name]
            dtype = _ST_DTYPES.get(e["dtype"])
            if dtype is None:
                raise ReleaseError(f"{self.path}: tensor '{name}' has dtype {e['dtype']}, which a release "
                                   f"does not hold.")
            begin, end = e["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            with open(self.path, "rb") as fh:
                fh.seek(self._base + begin)
                if fh.readinto(raw.numpy()) != end - begin:
                    raise ReleaseError(f"{self.path} ends inside tensor '{name}' (truncated).")
            t = raw.view(dtype).reshape(e["shape"])
            self._last = (None, None)
            self._last = (name, t if dtype == torch.float32 else t.float())
        return self._last[1]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_release(path, verify: bool = False, stream: bool = False) -> Tuple[Any, Mapping]:
    """``(cfg, state_dict)`` of a release: full tensors under canonical names, in the stored dtype; with
    ``stream``, a :class:`StreamedWeights` (fp32, read on access) instead of a dict in memory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    if verify:
        problems = verify_release(path)
        if problems:
            raise ReleaseError("release is damaged:\n  - " + "\n  - ".join(problems))
    cfg = load_release_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ReleaseError(f"{weights} is missing.")
    try:
        state = StreamedWeights(weights) if stream else load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ReleaseError(f"cannot read {weights}: {e} (truncated or not a safetensors file).") from None
    return cfg, state


def _check_names(model_names: List[str], state: Dict[str, torch.Tensor], where, part: bool = False) -> None:
    """The model's names must all be in ``state``; unless the model is one pipeline stage (``part``),
    ``state`` must hold nothing else."""
    missing = sorted(set(model_names) - set(state))
    extra = [] if part else sorted(set(state) - set(model_names))
    if missing or extra:
        raise ReleaseError(f"{where} does not fit the model: missing {missing[:3]} ({len(missing)}), "
                           f"unexpected "
                           f"{extra[:3]} ({len(extra)}); was it made for another preset or model config?")


@torch.no_grad()
def load_state_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], where="release") -> None:
    """Copy full canonical tensors into ``model``'s parameters: this rank's TP shard, and under ZeRO-3
    (before ``deepspeed.initialize``) this rank's partition of it; no communication."""
    from megatron.core import parallel_state as mps

    from .names import to_canonical

    tp = mps.get_tensor_model_parallel_world_size()
    tp_rank = mps.get_tensor_model_parallel_rank()
    named = list(model.named_parameters())
    _check_names([to_canonical(n) for n, _ in named], state, where, part=hasattr(model, "split"))
    for name, p in named:
        full = state[to_canonical(name)]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            full = full.chunk(tp, dim=p.partition_dim)[tp_rank]
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(full.shape) != shape:
            raise ReleaseError(f"{where}: '{name}' has shape {tuple(full.shape)} (TP shard), the model "
                               f"{shape}; the release was made for another model config.")
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition: elements [r*k, (r+1)*k) of the padded flat tensor
            import torch.distributed as dist

            part = p.ds_tensor
            k = part.numel()
            r = dist.get_rank(group=p.ds_process_group)
            flat = full.reshape(-1)
            piece = flat[r * k:(r + 1) * k]
            part.data.zero_()
            part.data.view(-1)[:piece.numel()].copy_(piece)
        else:
            p.data.copy_(full)


def check_release_matches(run_cfg, release_cfg, path) -> None:
    """Refuse a release of another model (preset, tokenizer, sizes) with every difference named."""
    from heptapod_ds.config.loader import to_dict
    from heptapod_ds.engine.checkpoint import IDENTITY_FIELDS, _get

    mine, theirs = to_dict(run_cfg), to_dict(release_cfg)
    diffs = [f"{k}: release {_get(theirs, k)!r}, this run {_get(mine, k)!r}" for k in IDENTITY_FIELDS
             if _get(theirs, k) != _get(mine, k)]
    if diffs:
        raise ReleaseError(f"release {path} ({pathlib.Path(path) / CONFIG_FILE}) is another model:\n  - "
                           + "\n  - ".join(diffs) + "\nSet these fields to the release's values or use "
                                                    "another "
                                                    "release.")


def load_release_into(model: torch.nn.Module, path, run_cfg=None) -> Any:
    """Load a release's weights into an existing model (any TP size; ZeRO-3 partitions too). Returns its cfg.

    With ``run_cfg``, a release of another model is refused before any tensor is touched.
    """
    cfg, state = load_release(path)
    if run_cfg is not None:
        check_release_matches(run_cfg, cfg, path)
    load_state_into(model, state, where=pathlib.Path(path) / WEIGHTS_FILE)
    log.info("loaded release %s (%d tensors)", path, len(state))
    return cfg


def build_model_from_release(path, device=None) -> torch.nn.Module:
    """The release's model in eval mode, for this process's parallel state (one local rank if none)."""
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.model import build_model

    from .world import ensure_local_world

    cfg = load_release_config(path)
    ensure_local_world()
    cfg.parallel.tensor = parallel_state.get_info().tp_size
    model = build_model(cfg, device=device)
    load_release_into(model, path)
    model.eval()
    return model
