"""Resolve a DeepSpeed JSON config against the training config.

The training config (``HeptapodConfig``) is the single source of truth for batch sizes, gradient
accumulation, clipping, precision and the ZeRO stage. A DeepSpeed JSON may leave these as ``"auto"``
(the files in ``ds_configs/`` do) and they are filled in here; an explicit JSON value that disagrees
with the training config is an error that names both values and says what to change. Everything
else in the JSON (bucket sizes, offload, prefetching, ...) is passed to DeepSpeed as written.

The optimizer and LR scheduler are built by :mod:`heptapod_ds.engine.optim` and
:mod:`heptapod_ds.engine.schedule` and passed to ``deepspeed.initialize`` as objects, so a JSON
``optimizer``/``scheduler`` section is refused (DeepSpeed would silently prefer one of the two).
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import Any, Dict, List, Optional

import torch

from heptapod_ds.config.loader import ConfigError

AUTO = "auto"
DS_CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "ds_configs"


def resolve_precision(cfg) -> str:
    """``parallel.precision`` with ``auto`` made concrete: bf16 with CUDA, fp32 on CPU."""
    precision = cfg.parallel.precision
    if precision == AUTO:
        return "bf16" if torch.cuda.is_available() else "fp32"
    return precision


def default_path(zero_stage: int) -> pathlib.Path:
    """The shipped JSON for a ZeRO stage (``ds_configs/zero{stage}.json``)."""
    path = DS_CONFIG_DIR / f"zero{zero_stage}.json"
    if not path.is_file():
        raise ConfigError(f"no built-in DeepSpeed config for parallel.zero_stage={zero_stage} at {path}; "
                          f"pass parallel.ds_config=<file> (see ds_configs/ in the repository).")
    return path


def load_json(path) -> Dict[str, Any]:
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config '{path}' does not exist; pass a file from ds_configs/.")
    with open(path) as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"DeepSpeed config '{path}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config '{path}' must hold a JSON object, got {type(data).__name__}.")
    return data


def file_overrides(path) -> List[str]:
    """Config overrides implied by a JSON given on the command line (``--ds_config zero3.json``).

    A JSON that fixes its ZeRO stage selects that stage: ``train.py`` puts these overrides *before*
    the user's ``key=value`` list, so an explicit ``parallel.zero_stage`` still wins and then a
    disagreement is reported by :func:`resolve`.
    """
    stage = load_json(path).get("zero_optimization", {}).get("stage", AUTO)
    return [] if stage == AUTO else [f"parallel.zero_stage={int(stage)}"]


def _fill(ds: Dict[str, Any], key: str, value: Any, source: str, origin: str, fix: str,
          errors: List[str]) -> None:
    """Set ``ds[key]`` to ``value`` if it is ``auto`` or absent; record a conflict otherwise."""
    current = ds.get(key, AUTO)
    if current == AUTO:
        ds[key] = value
    elif current != value:
        errors.append(f"{origin} sets \"{key}\": {json.dumps(current)} but {source}={value}. The training "
                      f"config wins: write \"{key}\": \"auto\" in the JSON, or {fix}.")


def resolve(cfg, data_parallel_size: Optional[int] = None) -> Dict[str, Any]:
    """Load ``cfg.parallel.ds_config`` (or the built-in file for the ZeRO stage), fill ``auto``, check.

    ``data_parallel_size`` defaults to ``world_size / (tensor x pipeline)`` of the validated config.
    Returns the dict to hand to ``deepspeed.initialize(config=...)``.
    """
    par, tr = cfg.parallel, cfg.train
    path = par.ds_config or default_path(par.zero_stage)
    origin = f"DeepSpeed config '{path}'"
    ds = copy.deepcopy(load_json(path))
    errors: List[str] = []

    if data_parallel_size is None:
        if par.world_size <= 0:
            raise ConfigError("parallel.world_size is unknown; validate the config with the launch's world "
                              "size (load_config(..., world_size=N)) before resolving the DeepSpeed config.")
        data_parallel_size = par.world_size // par.model_parallel
    if tr.grad_accum <= 0:
        raise ConfigError("train.grad_accum is still 0 (auto); validate the config (load_config / validate) "
                          "before resolving the DeepSpeed config.")
    if tr.micro_batch_size * tr.grad_accum * data_parallel_size != tr.global_batch_size:
        raise ConfigError(f"train.micro_batch_size x train.grad_accum x data-parallel size = "
                          f"{tr.micro_batch_size} x {tr.grad_accum} x {data_parallel_size} != "
                          f"train.global_batch_size={tr.global_batch_size}; set train.grad_accum=0 to "
                          f"derive it.")

    for section in ("optimizer", "scheduler"):
        if section in ds:
            errors.append(f"{origin} has an \"{section}\" section; heptapod_ds builds the {section} from the "
                          f"training config ({'optimizer.*' if section == 'optimizer' else 'schedule.*'}). "
                          f"Remove the section from the JSON and set those fields instead.")
    _fill(ds, "train_batch_size", tr.global_batch_size, "train.global_batch_size", origin,
          f"pass train.global_batch_size={ds.get('train_batch_size')}", errors)
    if par.pipeline > 1:
        # Megatron's schedule runs all train.grad_accum micro-batches of a step; each stage's engine sees
        # them as one batch and steps once per schedule (every engine.step() is an optimizer step).
        _fill(ds, "train_micro_batch_size_per_gpu", tr.micro_batch_size * tr.grad_accum,
              "train.micro_batch_size x train.grad_accum (one pipeline schedule)", origin,
              "leave it to the training config under pipeline parallelism", errors)
        _fill(ds, "gradient_accumulation_steps", 1, "1 (the pipeline schedule accumulates)", origin,
              "leave it to the training config under pipeline parallelism", errors)
    else:
        _fill(ds, "train_micro_batch_size_per_gpu", tr.micro_batch_size, "train.micro_batch_size", origin,
              f"pass train.micro_batch_size={ds.get('train_micro_batch_size_per_gpu')}", errors)
        _fill(ds, "gradient_accumulation_steps", tr.grad_accum, "train.grad_accum", origin,
              f"pass train.grad_accum={ds.get('gradient_accumulation_steps')}", errors)
    _fill(ds, "gradient_clipping", float(cfg.optimizer.grad_clip), "optimizer.grad_clip", origin,
          f"pass optimizer.grad_clip={ds.get('gradient_clipping')}", errors)

    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", AUTO)
    if stage == AUTO:
        zero["stage"] = par.zero_stage
    elif stage != par.zero_stage:
        errors.append(f"{origin} sets zero_optimization.stage={stage} but parallel.zero_stage="
                      f"{par.zero_stage}. "
                      f"Pass parallel.zero_stage={stage} (train.py --ds_config does this for you), or use "
                      f"ds_configs/zero{par.zero_stage}.json.")

    precision = resolve_precision(cfg)
    want_bf16 = precision == "bf16"
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", AUTO) == AUTO:
        bf16["enabled"] = want_bf16
    elif bool(bf16["enabled"]) != want_bf16:
        errors.append(f"{origin} sets bf16.enabled={json.dumps(bf16['enabled'])} but parallel.precision="
                      f"{cfg.parallel.precision} resolves to {precision}. The training config wins: write "
                      f"\"enabled\": \"auto\", or pass parallel.precision="
                      f"{'bf16' if bf16['enabled'] else 'fp32'}.")
    fp16 = ds.get("fp16", {})
    if fp16.get("enabled", False) not in (False, AUTO):
        errors.append(f"{origin} enables fp16; heptapod_ds trains in bf16 (GPU) or fp32 (CPU). Remove the "
                      f"\"fp16\" section and choose parallel.precision=bf16 or fp32.")
    ds.pop("fp16", None)

    offload = is_offload(ds)
    if offload and zero["stage"] == 0:
        errors.append(f"{origin} offloads to CPU but ZeRO stage is 0; offload needs parallel.zero_stage>=1 "
                      f"(parameters: 3). Use ds_configs/zero3_offload.json with parallel.zero_stage=3.")
    offload_param = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    if offload_param and zero["stage"] != 3:
        errors.append(f"{origin} offloads parameters, which needs ZeRO stage 3, but the stage is "
                      f"{zero['stage']}.")
    if errors:
        raise ConfigError("DeepSpeed config does not match the training config:\n"
                          + "\n".join(f"  - {e}" for e in errors))

    if not torch.cuda.is_available():
        # Pinned host memory needs CUDA; on a CPU machine offload is a plain copy.
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                zero[key]["pin_memory"] = False
        if offload:
            # DeepSpeedCPUAdam would compile an extension for a gain that a CPU-only run does not have;
            # the torch AdamW is exact and DeepSpeed accepts it once this guard is lifted.
            ds["zero_force_ds_cpu_optimizer"] = False
    if par.pipeline > 1:
        # Each pipeline stage saves under its own tag (see checkpoint._engine_tag); DeepSpeed's check that
        # all ranks use one tag would warn on every save.
        ds.setdefault("checkpoint", {}).setdefault("tag_validation", "Ignore")
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def is_offload(ds: Dict[str, Any]) -> bool:
    """Whether the (resolved) JSON moves optimizer state to the CPU."""
    zero = ds.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
