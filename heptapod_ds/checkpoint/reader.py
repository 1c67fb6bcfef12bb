"""Read a training checkpoint of any layout (ZeRO 0-3, any DP and TP) into canonical full tensors.

:class:`TrainingCheckpoint` opens ``global_stepN/`` (or the newest complete one of a run), checks that
every file the layout implies is there, and hands out one *kind* of state at a time as a dict of
canonical name -> full fp32 tensor: ``fp32`` (the master weights, not the bf16 module copies),
``exp_avg`` and ``exp_avg_sq`` (AdamW moments) and ``ema``. Files are opened memory-mapped and read one
TP rank at a time, so a kind costs about one copy of the weights in memory. Every file goes through
:mod:`heptapod_ds.engine.safe_load` (``weights_only=True``, DeepSpeed's objects allowed by name).
"""
from __future__ import annotations

import json
import logging
import pathlib
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from heptapod_ds.engine import safe_load
from heptapod_ds.engine.checkpoint import META, TAG_RE

from . import zero_layout as zl
from .names import ParamSpec, is_extra_state, model_spec, saved_config, to_canonical

log = logging.getLogger(__name__)

KINDS = ("fp32", "exp_avg", "exp_avg_sq", "ema")


class CheckpointFormatError(ValueError):
    """A checkpoint whose files do not fit its recorded layout or model; the message names the file."""


def resolve_tag_dir(path) -> pathlib.Path:
    """``global_stepN`` itself, or the newest complete ``global_step*`` of a run / checkpoints dir."""
    path = pathlib.Path(path)
    if (path / META).is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    for root in (path / "checkpoints", path):
        if root.is_dir():
            found = sorted((int(m.group(1)), c) for c in root.iterdir()
                           if (m := TAG_RE.match(c.name)) and (c / META).is_file())
            if found:
                return found[-1][1]
    raise FileNotFoundError(f"{path} holds no complete training checkpoint (a global_stepN folder with "
                            f"{META}); "
                            f"pass a run directory, its checkpoints/ folder or a global_stepN folder.")


class TrainingCheckpoint:
    """One training checkpoint; see the module docstring."""

    def __init__(self, path, specs: Optional[List[ParamSpec]] = None):
        self.dir = resolve_tag_dir(path)
        try:
            self.meta: Dict[str, Any] = json.loads((self.dir / META).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointFormatError(f"{self.dir / META} is not readable JSON ({e}).") from None
        self.step = int(self.meta["step"])
        lay = self.meta["layout"]
        self.tp, self.pp, self.dp, self.zero = (int(lay["tensor"]), int(lay["pipeline"]), int(lay["dp"]),
                                                int(lay["zero_stage"]))
        self.cfg = saved_config(self.meta["config"], self.dir / META)
        self.has_ema = bool(self.meta.get("has_ema", False))
        self.specs = specs if specs is not None else model_spec(self.cfg)
        self.by_name = {s.name: s for s in self.specs}
        self.bf16 = bool(self.meta["config"].get("parallel", {}).get("precision") == "bf16")
        self._bf16_optim = None
        self.check_files()

    # ------------------------------------------------------------------ files
    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    def layout(self) -> Dict[str, int]:
        return {"tensor": self.tp, "pipeline": self.pp, "dp": self.dp, "zero_stage": self.zero}

    def _stage(self, pp_rank: int = 0) -> pathlib.Path:
        return zl.stage_dir(self.dir, self.pp, pp_rank)

    def _optim_path(self, tp_rank: int, dp_rank: int, pp_rank: int = 0) -> pathlib.Path:
        plain = self._stage(pp_rank) / zl.optim_file(tp_rank, dp_rank, bf16=False)
        if plain.is_file():
            return plain
        bf16 = self._stage(pp_rank) / zl.optim_file(tp_rank, dp_rank, bf16=True)
        return bf16 if bf16.is_file() else plain

    def expected_files(self) -> List[pathlib.Path]:
        """Every file this checkpoint's layout implies (DeepSpeed's and ours)."""
        out = []
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                if self.zero == 3:
                    out += [self._stage(pp_rank) / zl.model_file(3, tp_rank, d) for d in range(self.dp)]
                else:
                    out.append(self._stage(pp_rank) / zl.model_file(self.zero, tp_rank, 0))
                if self.zero >= 1:
                    out += [self._optim_path(tp_rank, d, pp_rank) for d in range(self.dp)]
        out += [self.dir / f"heptapod_rank{r:05d}.pt" for r in range(self.world_size)]
        return out

    def check_files(self) -> None:
        """Every expected file is there and is a whole torch archive (its zip directory reads; cheap:
        a truncated file loses the directory at its end)."""
        files = self.expected_files()
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise CheckpointFormatError(
                f"checkpoint {self.dir} (layout {self.layout()}) is incomplete: missing "
                f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}; copy the missing shard(s) "
                f"back "
                f"or use another checkpoint.")
        for p in files:
            try:
                with zipfile.ZipFile(p) as z:
                    z.infolist()
            except (zipfile.BadZipFile, OSError) as e:
                raise CheckpointFormatError(f"checkpoint file {p} ({p.stat().st_size} bytes) is truncated or "
                                            f"damaged ({e}); restore it or use another checkpoint.") from None

    def _load(self, path: pathlib.Path, deepspeed: bool = True) -> Any:
        return safe_load.load(path, allow_deepspeed=deepspeed, mmap=True)

    # ------------------------------------------------------------------ small state
    def model_states(self, tp_rank: int = 0, dp_rank: int = 0, pp_rank: int = 0) -> Dict[str, Any]:
        return self._load(self._stage(pp_rank) / zl.model_file(self.zero, tp_rank, dp_rank))

    def rank_state(self, rank: int) -> Dict[str, Any]:
        return safe_load.load(self.dir / f"heptapod_rank{rank:05d}.pt", allow_deepspeed=False, mmap=True)

    # ------------------------------------------------------------------ tensors
    def _canon(self, name: str, where: pathlib.Path) -> Optional[str]:
        if is_extra_state(name):
            return None
        canon = to_canonical(name)
        if canon not in self.by_name:
            raise CheckpointFormatError(f"{where} holds parameter '{name}' that the model of its own config "
                                        f"({self.meta.get('config', {}).get('preset')}) does not have; the "
                                        f"checkpoint does not match {self.dir / META}.")
        return canon

    def tensors(self, kind: str, progress: Optional[Callable[[int], None]] = None) -> Dict[str, torch.Tensor]:
        """Canonical name -> full fp32 tensor for ``kind`` (one of :data:`KINDS`)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "ema" and not self.has_ema:
            raise CheckpointFormatError(f"checkpoint {self.dir} has no EMA (train.ema_decay was 0); use the "
                                        f"raw "
                                        f"weights (--weights raw).")
        shards: Dict[str, List[torch.Tensor]] = {}
        for tp_rank in range(self.tp):
            local: Dict[str, torch.Tensor] = {}
            for pp_rank in range(self.pp):  # pipeline stages hold disjoint parts under the full names
                part = (self._ema_local(tp_rank, pp_rank) if kind == "ema"
                        else self._local(kind, tp_rank, pp_rank))
                twice = sorted(set(part) & set(local))
                if twice:
                    raise CheckpointFormatError(f"{self._stage(pp_rank)} holds {twice[:3]}, which an earlier "
                                                f"pipeline stage of {self.dir} holds too.")
                local.update(part)
            for name, t in local.items():
                shards.setdefault(name, []).append(t)
            if progress:
                progress(1)
        missing = [s.name for s in self.specs if s.name not in shards]
        if missing:
            raise CheckpointFormatError(f"checkpoint {self.dir} lacks {kind} of {len(missing)} parameters "
                                        f"of its "
                                        f"model, e.g. {missing[:3]}.")
        out = {}
        for spec in self.specs:
            full = spec.join(shards.pop(spec.name))
            if tuple(full.shape) != spec.shape:
                raise CheckpointFormatError(f"checkpoint {self.dir}: {kind} of '{spec.name}' has shape "
                                            f"{tuple(full.shape)}, its config's model {spec.shape}.")
            out[spec.name] = full.float().contiguous() if full.dtype != torch.float32 else full.contiguous()
        return out

    def _local(self, kind: str, tp_rank: int, pp_rank: int = 0) -> Dict[str, torch.Tensor]:
        if self.zero == 0:
            return self._local_zero0(kind, tp_rank, pp_rank)
        if self.zero in (1, 2):
            return self._local_zero12(kind, tp_rank, pp_rank)
        return self._local_zero3(kind, tp_rank, pp_rank)

    def _local_zero0(self, kind: str, tp_rank: int, pp_rank: int) -> Dict[str, torch.Tensor]:
        path = self._stage(pp_rank) / zl.model_file(0, tp_rank, 0)
        sd = self._load(path)
        module = sd["module"]
        names = [n for n in module if self._canon(n, path) is not None]
        from_local = {self._canon(n, path): n for n in names}
        opt = sd.get("optimizer")
        order = self._group_order([self._canon(n, path) for n in names])
        if isinstance(opt, dict) and "fp32_groups" in opt:
            # bf16/fp16 ZeRO-0 (DeepSpeed's FP16_UnfusedOptimizer): the fp32 master copies, one list per param
            # group in the optimizer's order, and the torch optimizer's state of those copies; the module holds
            # only their bf16 roundings
            masters = [t for group in opt["fp32_groups"] for t in group]
            if len(masters) != len(order):
                raise CheckpointFormatError(f"{path}: {len(masters)} fp32 master tensors for {len(order)} parameters.")
            if kind == "fp32":
                return {name: t.float() for name, t in zip(order, masters)}
            opt = opt["optimizer_state_dict"]
        elif kind == "fp32":
            return {self._canon(n, path): module[n] for n in names}
        if not opt or "state" not in opt:
            raise CheckpointFormatError(f"{path} holds no optimizer state DeepSpeed's ZeRO-0 writes (a torch "
                                        f"optimizer's, or FP16_UnfusedOptimizer's fp32_groups).")
        out = {}
        for idx, name in enumerate(order):
            st = opt["state"].get(idx)
            if not opt["state"]:  # torch creates AdamW state at the first step: a step-0 checkpoint has none
                out[name] = torch.zeros_like(module[from_local[name]], dtype=torch.float32)
                continue
            if st is None:
                raise CheckpointFormatError(f"{path}: no optimizer state for parameter #{idx} ('{name}').")
            out[name] = st[kind]
        return out

    def _group_order(self, canon_names: Iterable[str]) -> List[str]:
        """Names in the order of the optimizer's param groups (decay first), each group in module order."""
        names = list(canon_names)
        groups = sorted({self.by_name[n].group for n in names})
        return [n for g in groups for n in names if self.by_name[n].group == g]

    def _local_zero12(self, kind: str, tp_rank: int, pp_rank: int) -> Dict[str, torch.Tensor]:
        mpath = self._stage(pp_rank) / zl.model_file(self.zero, tp_rank, 0)
        ms = self._load(mpath)
        group_shapes = ms["param_shapes"]
        flats: List[List[torch.Tensor]] = [[] for _ in group_shapes]
        for d in range(self.dp):
            path = self._optim_path(tp_rank, d, pp_rank)
            osd = self._load(path)["optimizer_state_dict"]
            for g in range(len(group_shapes)):
                lean = osd["single_partition_of_fp32_groups"][g]
                if kind == "fp32":
                    piece = lean
                else:
                    base = osd["base_optimizer_state"]
                    state = base["state"].get(g, {}) if isinstance(base, dict) else base[g]
                    piece = state[kind][:lean.numel()] if kind in state else torch.zeros_like(lean)
                flats[g].append(piece.reshape(-1))
        out = {}
        for g, shapes in enumerate(group_shapes):
            flat = torch.cat(flats[g])
            offset = 0
            for name, shape in shapes.items():
                n = int(torch.Size(shape).numel())
                if offset + n > flat.numel():
                    raise CheckpointFormatError(f"the ZeRO files of TP rank {tp_rank} in {self.dir} hold "
                                                f"{flat.numel()} elements of group {g}, fewer than its "
                                                f"parameters need (truncated or from another layout).")
                out[self._canon(name, mpath)] = flat[offset:offset + n].view(tuple(shape))
                offset += n
        return out

    def _local_zero3(self, kind: str, tp_rank: int, pp_rank: int) -> Dict[str, torch.Tensor]:
        mpath = self._stage(pp_rank) / zl.model_file(3, tp_rank, 0)
        sub_groups = self._load(mpath)["param_shapes"]
        pieces: List[List[torch.Tensor]] = [[] for _ in sub_groups]
        for d in range(self.dp):
            path = self._optim_path(tp_rank, d, pp_rank)
            osd = self._load(path)["optimizer_state_dict"]
            for sg in range(len(sub_groups)):
                if kind == "fp32":
                    flat = osd["fp32_flat_groups"][sg]
                else:
                    st = osd["optimizer_state_dict"]["state"].get(sg, {})
                    flat = st[kind] if kind in st else torch.zeros_like(osd["fp32_flat_groups"][sg])
                pieces[sg].append(flat.reshape(-1))
        out = {}
        for sg, shapes in enumerate(sub_groups):
            offset = 0
            for name, shape in shapes.items():
                n = int(torch.Size(shape).numel())
                k = zl.zero3_piece(n, self.dp)
                parts = [pieces[sg][d][offset:offset + k] for d in range(self.dp)]
                if any(p.numel() != k for p in parts):
                    raise CheckpointFormatError(f"the ZeRO-3 files of TP rank {tp_rank} in {self.dir} are "
                                                f"shorter than parameter '{name}' needs (truncated or from "
                                                f"another layout).")
                out[self._canon(name, mpath)] = torch.cat(parts)[:n].view(tuple(shape))
                offset += k
        return out

    def _ema_local(self, tp_rank: int, pp_rank: int = 0) -> Dict[str, torch.Tensor]:
        first = self.rank_state(zl.global_rank(tp_rank, 0, pp_rank, self.tp, self.dp))["ema"]
        if first is None:
            owner = zl.global_rank(tp_rank, 0, pp_rank, self.tp, self.dp)
            raise CheckpointFormatError(f"{self.dir}/heptapod_rank{owner:05d}.pt "
                                        f"holds no EMA although {META} says has_ema.")
        names = list(first["names"])
        if not first["partitioned"]:
            return {self._canon(n, self.dir): t for n, t in zip(names, first["shadow"])}
        per_rank = [first["shadow"]] + [
            self.rank_state(zl.global_rank(tp_rank, d, pp_rank, self.tp, self.dp))["ema"]["shadow"]
                                        for d in range(1, self.dp)]
        out = {}
        for i, n in enumerate(names):
            canon = self._canon(n, self.dir)
            spec = self.by_name[canon]
            local = spec.local_shape(self.tp)
            numel = int(torch.Size(local).numel())
            out[canon] = torch.cat([per_rank[d][i].reshape(-1) for d in range(self.dp)])[:numel].view(local)
        return out

    # ------------------------------------------------------------------ training state
    def ema_counters(self) -> Dict[str, Any]:
        if not self.has_ema:
            return {}
        ema = self.rank_state(0)["ema"]
        return {"decay": float(ema["decay"]), "num_updates": int(ema["num_updates"])}

    def optimizer_step(self) -> int:
        """AdamW's step count (identical in every group and rank)."""
        if self.zero == 0:
            opt = self.model_states()["optimizer"]
            if "fp32_groups" in opt:  # bf16/fp16 ZeRO-0: the wrapped torch optimizer's state
                opt = opt["optimizer_state_dict"]
            steps = {float(s["step"]) for s in opt["state"].values()} or {0.0}
        else:
            osd = self._load(self._optim_path(0, 0))["optimizer_state_dict"]
            state = (osd["optimizer_state_dict"] if self.zero == 3 else osd["base_optimizer_state"])
            state = state["state"] if isinstance(state, dict) else dict(enumerate(state))
            steps = {float(s["step"]) for s in state.values() if "step" in s} or {0.0}
        if len(steps) != 1:
            raise CheckpointFormatError(f"checkpoint {self.dir}: AdamW step counts differ between groups "
                                        f"{steps}.")
        return int(steps.pop())

    def nbytes_by_file(self) -> Dict[str, int]:
        return {str(p.relative_to(self.dir)): p.stat().st_size for p in self.expected_files()}

