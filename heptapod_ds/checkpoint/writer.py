"""Write a training checkpoint of any layout (TP, PP, DP, ZeRO 0-3) from canonical full tensors.

Why the DeepSpeed files are written here rather than by DeepSpeed itself: a DeepSpeed engine of the
target layout needs ``tensor x dp`` live processes, each holding its module copy (ZeRO-0/1/2) plus
its optimizer partition - for the H preset at DP=64 that is far more than one CPU machine holds, while
the files themselves are a pure re-partitioning of three fp32 tensors per parameter. The arithmetic
of that partitioning is in :mod:`.zero_layout` (checked against DeepSpeed 0.19's own saves), and every
written checkpoint is proven by DeepSpeed loading it (tests: resume on another shape, round trips).

Each output file is built from the parameters it needs, one file at a time: memory is about one file
plus the canonical tensors, which the caller hands in memory-mapped.

Pipeline parallelism (``--pipeline N``): each stage is its own DeepSpeed engine over the stage's part of
the model, so each stage gets the files of a PP=1 checkpoint of that part in ``pp_stageKK/`` (see
``engine/checkpoint.py::_engine_tag``), with the stage's own optimizer groups (a group a stage has no
parameter of is absent there, as in :func:`heptapod_ds.engine.optim.param_groups`). Which parameters a
stage holds, and in which order, is read off the stage model itself
(:class:`heptapod_ds.pipeline.stage.PipelineStage` built on the ``meta`` device), the split off
:func:`heptapod_ds.pipeline.split_model` of the target config: the one place that decides both.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from heptapod_ds.engine import integrity
from heptapod_ds.engine.checkpoint import META

from . import zero_layout as zl
from .names import ParamSpec, from_canonical, group_order, te_extra_state_names, te_parameter_order

log = logging.getLogger(__name__)

TensorsOf = Callable[[str], Optional[Dict[str, torch.Tensor]]]  # kind -> tensors (None: zeros)


@dataclass
class TrainingState:
    """Everything a resume needs, independent of the layout it was saved in."""
    cfg: Any                                  # the run's config (model identity, optimizer, schedule)
    specs: List[ParamSpec]
    step: int                                 # trainer step = checkpoint tag
    optimizer_step: int                       # AdamW's step count
    tensors: TensorsOf                        # "fp32", "exp_avg", "exp_avg_sq", "ema"
    scheduler: Optional[Dict[str, Any]]       # LambdaLR state; None = fresh
    counters: Dict[str, int]                  # DeepSpeed's global_steps, global_samples, skipped_steps
    ema: Optional[Dict[str, Any]]             # {"decay", "num_updates"}; None = no EMA
    rng: Dict[str, Any]                       # python / numpy / torch / cuda state (layout-independent)
    megatron_rng: List[Dict[str, Any]]        # the TP tracker's states per source TP rank
    # per source pipeline stage: (python/numpy/torch states, TP tracker states per TP rank); stages the
    # source lacks take stage 0's. Empty: ``rng`` / ``megatron_rng`` for every stage.
    stage_rng: List[Any] = field(default_factory=list)
    client_state: Dict[str, Any] = field(default_factory=dict)   # step, data position, nonfinite
    source: Dict[str, Any] = field(default_factory=dict)


def target_config(cfg, tensor: int, pipeline: int, dp: int, zero: int, layer_impl: Optional[str] = None):
    """``cfg`` for the new layout: same model and global batch; micro batch / accumulation refitted;
    ``layer_impl`` (local / transformer_engine) replaces ``backbone.transformer_impl`` when given."""
    import copy

    from heptapod_ds.config.loader import validate

    new = copy.deepcopy(cfg)
    new.parallel.tensor, new.parallel.pipeline, new.parallel.zero_stage = tensor, pipeline, zero
    if layer_impl is not None:
        new.backbone.transformer_impl = layer_impl
    if pipeline != cfg.parallel.pipeline:
        new.parallel.pipeline_split = "auto"  # an explicit split of the source's stage count cannot apply
    new.parallel.world_size = tensor * pipeline * dp
    new.parallel.ds_config = None
    tr = new.train
    if tr.global_batch_size % dp:
        raise ValueError(f"train.global_batch_size={tr.global_batch_size} is not divisible by --dp {dp}; the "
                         f"global batch must stay the same for the run to see the same samples.")
    per_rank = tr.global_batch_size // dp
    if per_rank % tr.micro_batch_size:
        tr.micro_batch_size = per_rank  # keep the global batch, one micro batch per step
    tr.grad_accum = 0
    return validate(new, world_size=new.parallel.world_size)


def _adamw_groups(cfg, n_groups_specs: List[List[ParamSpec]], last_lr: List[float]) -> List[Dict[str, Any]]:
    """torch AdamW's param_group dicts (hyper-parameters), as engine/optim.py builds them."""
    o = cfg.optimizer
    dummy = [{"params": [torch.zeros(1)], "weight_decay": o.weight_decay if specs[0].decay else 0.0}
             for specs in n_groups_specs]
    opt = torch.optim.AdamW(dummy, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    groups = opt.state_dict()["param_groups"]
    for g, lr in zip(groups, last_lr):
        g["lr"] = lr
        g["initial_lr"] = o.lr
    return groups


def scheduler_for_groups(sched: Dict[str, Any], n_groups: int, where: str) -> Dict[str, Any]:
    """The LR schedule state for an optimizer of ``n_groups`` param groups.

    A pipeline stage's optimizer may have fewer groups than the whole model's (a stage without no-decay
    parameters). The schedule is one lambda for every group, so its per-group lists hold one value
    repeated; they are refitted to the new count. Per-group values that differ are refused."""
    n_src = len(sched.get("base_lrs", []))
    if n_src == n_groups:
        return dict(sched)
    out = dict(sched)
    for key, value in sched.items():
        if isinstance(value, list) and len(value) == n_src and n_src > 0:
            if any(v != value[0] for v in value):
                raise ValueError(f"{where}: the LR schedule's '{key}' differs between param groups "
                                 f"({value}); it cannot be refitted from {n_src} to {n_groups} groups.")
            out[key] = [value[0]] * n_groups
    return out


def fresh_scheduler_state(cfg, n_groups: int) -> Dict[str, Any]:
    from heptapod_ds.engine.schedule import build_scheduler

    opt = torch.optim.AdamW([{"params": [torch.zeros(1)]} for _ in range(n_groups)], lr=cfg.optimizer.lr)
    return build_scheduler(opt, cfg).state_dict()


def target_layer_impl(cfg):
    """(layer implementation, core attention) whose names the written checkpoint uses: the target
    config's ``backbone.transformer_impl``, with ``auto`` resolved on this machine (TransformerEngine
    when it imports here); ``--layer-impl`` sets it for another machine."""
    from heptapod_ds.model.layers import resolve_attention, transformer_engine_available

    impl = cfg.backbone.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if transformer_engine_available() else "local"
    return impl, resolve_attention(cfg.backbone.attention, impl)


class LayoutWriter:
    """Writes ``global_step{N}/`` for one target layout into a (staging) checkpoints folder."""

    def __init__(self, state: TrainingState, cfg, out_ckpts: pathlib.Path, progress=None):
        from heptapod_ds.engine import ds_config as ds_config_mod

        self.s = state
        self.cfg = cfg
        self.tp, self.pp = cfg.parallel.tensor, cfg.parallel.pipeline
        self.dp = cfg.parallel.world_size // (self.tp * self.pp)
        self.zero = cfg.parallel.zero_stage
        self.split = None
        if self.pp > 1:
            from heptapod_ds.pipeline import split_model
            self.split = split_model(cfg)
        self.ds = ds_config_mod.resolve(cfg, data_parallel_size=self.dp)
        self.tag = f"global_step{state.step}"
        self.root = out_ckpts / self.tag
        self.root.mkdir(parents=True)
        self.progress = progress
        self._tensors: Dict[str, Optional[Dict[str, torch.Tensor]]] = {}
        self._stage_cache: Dict[int, Any] = {}
        self.impl, self.attention = target_layer_impl(cfg)
        by_name = {s.name: s for s in state.specs}
        self._by_name = by_name
        self._sched_src = state.scheduler or fresh_scheduler_state(state.cfg, len(group_order(state.specs)))
        import deepspeed
        self.ds_version = deepspeed.__version__
        self._enter_stage(0)

    def _enter_stage(self, p: int) -> None:
        """Point the file builders at pipeline stage ``p``: its folder, parameters, groups and schedule."""
        self.stage = p
        self.dir = zl.stage_dir(self.root, self.pp, p)
        self.dir.mkdir(parents=True, exist_ok=True)
        _, order, _ = self._stage_model(p)
        self.groups = group_order([self._by_name[n] for n in order])
        self.sched = scheduler_for_groups(self._sched_src, len(self.groups), f"pipeline stage {p}")
        self.param_groups = _adamw_groups(self.cfg, self.groups, list(self.sched["_last_lr"]))

    # ------------------------------------------------------------------ tensors
    def _local(self, kind: str, spec: ParamSpec, tp_rank: int) -> torch.Tensor:
        """This TP rank's shard of ``spec`` for ``kind`` (zeros for a fresh optimizer state)."""
        if kind not in self._tensors:
            self._tensors[kind] = self.s.tensors(kind)  # memory-mapped or in memory, as the caller hands it
        tensors = self._tensors[kind]
        full = tensors.get(spec.name) if tensors is not None else None
        if full is None:
            return torch.zeros(spec.local_shape(self.tp))
        return spec.shard(full, self.tp, tp_rank)

    def _owned(self, kind: str, spec: ParamSpec, tp_rank: int) -> torch.Tensor:
        """A tensor to save on its own: a TP shard is copied (``torch.save`` of a view writes the whole
        storage); an unsplit tensor is saved as is (from the memory-mapped canonical file, no copy)."""
        t = self._local(kind, spec, tp_rank)
        return t.clone() if (spec.split_dim is not None and self.tp > 1) else t

    def _has(self, kind: str) -> bool:
        if kind not in self._tensors:
            self._tensors[kind] = self.s.tensors(kind)
        return self._tensors[kind] is not None

    def _flat_slice(self, kind: str, specs: List[ParamSpec], tp_rank: int, start: int, length: int,
                    pad: int = 0) -> torch.Tensor:
        """Elements [start, start+length) of the concatenation of ``specs``' local shards (flattened), then
        ``pad`` zeros: one allocation, filled parameter by parameter."""
        out = torch.zeros(length + pad)
        if length == 0 or not self._has(kind):
            return out
        offset = 0
        for spec in specs:
            n = int(torch.Size(spec.local_shape(self.tp)).numel())
            lo, hi = max(start, offset), min(start + length, offset + n)
            if lo < hi:
                flat = self._local(kind, spec, tp_rank).reshape(-1)
                out[lo - start:hi - start] = flat[lo - offset:hi - offset]
            offset += n
            if offset >= start + length:
                break
        return out

    def _zero3_flat(self, kind: str, specs: List[ParamSpec], r: int, d: int) -> torch.Tensor:
        """DP rank d's ZeRO-3 pieces of ``specs`` (each padded to ceil(numel / dp)), concatenated."""
        sizes = [zl.zero3_piece(int(torch.Size(s.local_shape(self.tp)).numel()), self.dp) for s in specs]
        out = torch.zeros(sum(sizes))
        if not self._has(kind):
            return out
        offset = 0
        for spec, k in zip(specs, sizes):
            local = self._local(kind, spec, r).reshape(-1)
            part = local[d * k:(d + 1) * k]
            out[offset:offset + part.numel()] = part
            offset += k
        return out

    # ------------------------------------------------------------------ files
    def _common(self, module, optimizer, param_shapes) -> Dict[str, Any]:
        s = self.s
        frozen = OrderedDict() if self.zero == 3 else ({} if self.zero == 2 else None)
        return {"module": module, "buffer_names": [], "optimizer": optimizer, "param_shapes": param_shapes,
                "frozen_param_shapes": frozen, "shared_params": {} if self.zero >= 1 else None,
                "frozen_param_fragments": {} if self.zero >= 2 else None, "lr_scheduler": dict(self.sched),
                "data_sampler": None, "random_ltd": None,
                "skipped_steps": int(s.counters.get("skipped_steps", 0)),
                "global_steps": int(s.counters.get("global_steps", s.optimizer_step)),
                "global_samples": int(s.counters.get("global_samples",
                                                     s.optimizer_step * self.cfg.train.global_batch_size)),
                "dp_world_size": self.dp, "mp_world_size": self.tp,
                "checkpoint_parallel_dimensions": {"pp_degree": self.pp, "tp_degree": self.tp},
                "ds_config": self.ds, "ds_version": self.ds_version, "heptapod_step": int(s.step)}

    def _name(self, canonical: str) -> str:
        """The name the target layer implementation gives canonical parameter ``canonical``."""
        return from_canonical(canonical, self.impl)

    def _stage_model(self, p: int):
        """(non-parameter state dict entries, canonical parameter names in the target model's order, the
        state dict's keys as (target key, canonical name or None)) of stage ``p`` (the whole model at
        PP=1), read off the local-spec model built on the ``meta`` device as the trainer builds it; for a
        TransformerEngine target, renamed and reordered as :mod:`.names` says a TE model has them."""
        if p not in self._stage_cache:
            from heptapod_ds.model.heptapod import HeptapodModel
            with torch.device("meta"):
                model = HeptapodModel(self.s.cfg, impl="local", tensor_parallel=1)
                if self.pp > 1:
                    from heptapod_ds.pipeline.stage import PipelineStage
                    model = PipelineStage(model, self.split, p)
            params = {n for n, _ in model.named_parameters()}
            extras = OrderedDict()
            for k, v in model.state_dict().items():
                if k in params:
                    continue
                if torch.is_tensor(v):
                    raise NotImplementedError(f"the model has a persistent buffer '{k}'; the checkpoint "
                                              f"writer "
                                              f"does not know its value (extend "
                                              f"heptapod_ds/checkpoint/writer.py).")
                extras[k] = v
            order = [n for n, _ in model.named_parameters()]
            if self.impl == "transformer_engine":
                order = te_parameter_order(order)
                for k in te_extra_state_names(order, self.attention):
                    extras[k] = None  # TE's set_extra_state takes None as "no FP8 state"
            keys = [(self._name(n), n) for n in order] + [(k, None) for k in extras]
            self._stage_cache[p] = (extras, order, keys)
        return self._stage_cache[p]

    def _module(self, tp_rank: int, placeholders: bool) -> "OrderedDict[str, Any]":
        extras, _, keys = self._stage_model(self.stage)
        module = OrderedDict()
        for key, canonical in keys:
            if canonical is None:
                module[key] = extras[key]
            elif placeholders:
                module[key] = torch.empty(0)
            else:
                module[key] = self._owned("fp32", self._by_name[canonical], tp_rank)
        return module

    def _param_shapes(self, sub_groups: List[List[ParamSpec]]):
        return [OrderedDict((self._name(s.name), torch.Size(s.local_shape(self.tp))) for s in g)
                for g in sub_groups]

    def _loss_scaler(self):
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        return LossScaler(scale=1.0)

    def _step_tensor(self) -> torch.Tensor:
        return torch.tensor(float(self.s.optimizer_step))

    def _save(self, obj, name: str, root: Optional[pathlib.Path] = None) -> None:
        torch.save(obj, (root or self.dir) / name)
        if self.progress:
            self.progress(1)

    def _save_optim(self, obj, r: int, d: int) -> None:
        """Plain ``zero_pp_rank_*`` names (what DeepSpeed's zero_to_fp32 expects); a bf16 run, whose DeepSpeed
        looks for ``bf16_zero_pp_rank_*``, finds them through ``engine.safe_load.safe_deepspeed_loads``."""
        self._save(obj, zl.optim_file(r, d, bf16=self.cfg.parallel.precision == "bf16"))

    def file_count(self) -> int:
        per_tp = {0: 1, 1: 1 + self.dp, 2: 1 + self.dp, 3: 2 * self.dp}[self.zero]
        return (per_tp * self.tp + self.tp * self.dp) * self.pp

    def write(self) -> pathlib.Path:
        for p in range(self.pp):
            self._enter_stage(p)
            for r in range(self.tp):
                {0: self._zero0, 1: self._zero12, 2: self._zero12, 3: self._zero3}[self.zero](r)
            self._rank_files()
        self._meta()
        return self.root

    def _zero0(self, r: int) -> None:
        order = [s for g in self.groups for s in g]
        state = {}
        for i, spec in enumerate(order):
            state[i] = {"step": self._step_tensor(), "exp_avg": self._owned("exp_avg", spec, r),
                        "exp_avg_sq": self._owned("exp_avg_sq", spec, r)}
        groups, i = [], 0
        for g, pg in zip(self.groups, self.param_groups):
            groups.append(dict(pg, params=list(range(i, i + len(g)))))
            i += len(g)
        optimizer = {"state": state, "param_groups": groups}
        self._save(self._common(self._module(r, placeholders=False), optimizer, None), zl.model_file(0, r, 0))

    def _zero12(self, r: int) -> None:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        self._save(self._common(self._module(r, placeholders=False), None, self._param_shapes(self.groups)),
                   zl.model_file(self.zero, r, 0))
        numels = [[int(torch.Size(s.local_shape(self.tp)).numel()) for s in g] for g in self.groups]
        for d in range(self.dp):
            lean, state, paddings, mappings = [], {}, [], []
            for gi, specs in enumerate(self.groups):
                total = sum(numels[gi])
                start, length, pad = zl.zero12_slice(total, self.dp, d)
                lean.append(self._flat_slice("fp32", specs, r, start, length))
                state[gi] = {"step": self._step_tensor(),
                             "exp_avg": self._flat_slice("exp_avg", specs, r, start, length, pad),
                             "exp_avg_sq": self._flat_slice("exp_avg_sq", specs, r, start, length, pad)}
                paddings.append(pad)
                mapping, offset = OrderedDict(), 0
                for spec, n in zip(specs, numels[gi]):
                    lo, hi = max(start, offset), min(start + length, offset + n)
                    if lo < hi:
                        mapping[self._name(spec.name)] = fragment_address(numel=hi - lo, start=lo - start)
                    offset += n
                mappings.append(mapping)
            osd = {"loss_scaler": self._loss_scaler(), "dynamic_loss_scale": False, "overflow": False,
                   "clip_grad": float(self.cfg.optimizer.grad_clip),
                   "base_optimizer_state": {"state": state,
                                            "param_groups": [dict(pg, params=[i]) for i, pg in
                                                             enumerate(self.param_groups)]},
                   "single_partition_of_fp32_groups": lean,
                   "zero_stage": (ZeroStageEnum.gradients if self.zero == 2
                                  else ZeroStageEnum.optimizer_states),
                   "group_paddings": paddings,
                   "param_alignment_paddings": [[0] * len(g) for g in self.groups],
                   "partition_count": [self.dp] * len(self.groups), "ds_version": self.ds_version,
                   "param_slice_mappings": mappings}
            self._save_optim({"optimizer_state_dict": osd, "ds_config": self.ds,
                              "ds_version": self.ds_version}, r, d)
            del osd, lean, state  # freed before the next rank's partition is built, not after

    def _zero3_sub_groups(self) -> List[List[ParamSpec]]:
        size = int(self.ds["zero_optimization"].get("sub_group_size", 1_000_000_000))
        subs, owner = [], []
        for gi, specs in enumerate(self.groups):
            numels = [int(torch.Size(s.local_shape(self.tp)).numel()) for s in specs]
            for idx in zl.zero3_sub_groups(numels, self.dp, size):
                subs.append([specs[i] for i in idx])
                owner.append(gi)
        self._sub_owner = owner
        return subs

    def _zero3(self, r: int) -> None:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        subs = self._zero3_sub_groups()
        for d in range(self.dp):
            self._save(self._common(self._module(r, placeholders=True), None, self._param_shapes(subs)),
                       zl.model_file(3, r, d))
            flats, state = [], {}
            for si, specs in enumerate(subs):
                flats.append(self._zero3_flat("fp32", specs, r, d))
                state[si] = {"step": self._step_tensor(), "exp_avg": self._zero3_flat("exp_avg", specs, r, d),
                             "exp_avg_sq": self._zero3_flat("exp_avg_sq", specs, r, d)}
            groups = [dict(pg, params=[si for si, o in enumerate(self._sub_owner) if o == gi])
                      for gi, pg in enumerate(self.param_groups)]
            osd = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": self._loss_scaler(),
                   "dynamic_loss_scale": False, "overflow": False, "partition_count": self.dp,
                   "optimizer_state_dict": {"state": state, "param_groups": groups},
                   "fp32_flat_groups": flats}
            self._save_optim({"optimizer_state_dict": osd, "ds_config": self.ds,
                              "ds_version": self.ds_version}, r, d)
            del osd, flats, state  # freed before the next rank's partition is built, not after

    # ------------------------------------------------------------------ ours
    def _ema_state(self, r: int, d: int) -> Optional[Dict[str, Any]]:
        if self.s.ema is None:
            return None
        partitioned = self.zero == 3
        if not partitioned and d != 0:
            return None
        _, order, _ = self._stage_model(self.stage)
        by_name = self._by_name
        shadow = []
        for name in order:
            spec = by_name[name]
            if partitioned:
                shadow.append(self._zero3_flat("ema", [spec], r, d))
            else:
                shadow.append(self._owned("ema", spec, r))
        return {"decay": float(self.s.ema["decay"]), "num_updates": int(self.s.ema["num_updates"]),
                "partitioned": partitioned, "names": [self._name(n) for n in order], "shadow": shadow}

    def _rank_files(self) -> None:
        """``heptapod_rank*.pt`` of the ranks of the current stage."""
        p = self.stage
        if self.s.stage_rng:
            base, trackers = self.s.stage_rng[p if p < len(self.s.stage_rng) else 0]
        else:
            base, trackers = self.s.rng, self.s.megatron_rng
        for d in range(self.dp):
            for r in range(self.tp):
                rank = zl.global_rank(r, d, p, self.tp, self.dp)
                # the TP tracker of a TP rank the source did not have keeps its fresh seeding (None)
                megatron = trackers[r] if r < len(trackers) else None
                rng = dict(base, megatron=megatron)
                own = {"rng": rng, "client_state": dict(self.s.client_state), "ema": self._ema_state(r, d),
                       "rank": rank}
                self._save(own, f"heptapod_rank{rank:05d}.pt", root=self.root)  # beside the stage folders
                del own

    def _meta(self) -> None:
        from heptapod_ds.config.loader import to_dict

        meta = {"step": int(self.s.step), "tag": self.tag, "time": time.time(),
                "world_size": self.tp * self.dp * self.pp,
                "layout": {"tensor": self.tp, "pipeline": self.pp, "dp": self.dp, "zero_stage": self.zero,
                           "pipeline_split": self.split.counts if self.split is not None else None},
                "has_ema": self.s.ema is not None, "config": to_dict(self.cfg),
                "converted_from": self.s.source}
        # the same checksums and seal as a checkpoint the trainer writes: resume=auto and `verify` check them
        meta["files"] = integrity.describe_files(self.root, integrity.list_files(self.root))
        meta = integrity.seal_meta(meta)
        (self.root / META).write_text(json.dumps(meta, indent=1, default=str))
        (self.root.parent / "latest").write_text(self.tag)
