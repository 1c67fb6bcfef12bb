"""Build the DeepSpeed engine: model (under ``zero.Init`` for ZeRO-3), AdamW, LR schedule.

Order matters and is fixed here once: torch.distributed and megatron's groups exist first
(``heptapod_ds.distributed.initialize``); DeepSpeed adopts that process group; ``zero.Init`` and
``deepspeed.initialize`` both get the megatron ``mpu`` and the data-parallel group, without which
TP>1 is silently corrupted (ZeRO would partition and broadcast over the world group).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable, Tuple

import torch
from torch import nn

from heptapod_ds.distributed import parallel_state

from . import ds_config as ds_config_mod
from .optim import build_optimizer
from .schedule import build_scheduler

log = logging.getLogger(__name__)


def quiet_deepspeed() -> None:
    """Silence the FutureWarnings DeepSpeed 0.19 emits on every step (they are not ours to fix)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deepspeed.*")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def init_deepspeed_distributed() -> None:
    """Let DeepSpeed adopt the process group built by ``heptapod_ds.distributed.initialize``."""
    import deepspeed

    info = parallel_state.get_info()
    deepspeed.init_distributed(dist_backend=info.backend, auto_mpi_discovery=False)


def build_engine(cfg, model_builder: Callable[[], nn.Module], ds_config=None) -> Tuple[Any, Any, Any]:
    """Return ``(engine, optimizer, scheduler)`` for ``cfg``; ``model_builder()`` makes the model.

    ``ds_config`` defaults to :func:`heptapod_ds.engine.ds_config.resolve(cfg)`. With ZeRO-3 the
    model is built inside ``deepspeed.zero.Init`` over the data-parallel group, so no rank ever
    holds the full parameters. The returned optimizer is DeepSpeed's wrapper (``engine.optimizer``);
    the scheduler is stepped by ``engine.step()`` at each accumulation boundary.
    """
    import deepspeed

    quiet_deepspeed()
    info = parallel_state.get_info()
    if not callable(model_builder):
        raise TypeError(f"model_builder must be a callable returning an nn.Module, "
                        f"got {type(model_builder).__name__}.")
    ds = ds_config if ds_config is not None else ds_config_mod.resolve(cfg, data_parallel_size=info.dp_size)
    stage = ds["zero_optimization"]["stage"]
    if stage != cfg.parallel.zero_stage:
        raise ValueError(f"ds_config has ZeRO stage {stage} but parallel.zero_stage="
                         f"{cfg.parallel.zero_stage}; "
                         f"resolve the DeepSpeed config from this training config.")
    if stage == 3 and info.pp_size > 1:
        raise ValueError(f"ZeRO stage 3 with pipeline={info.pp_size}: ZeRO-3 gathers parameters inside each "
                         f"forward with collectives every rank must join, which deadlocks across stages; use "
                         f"parallel.zero_stage=2 (or 1, 0) with pipeline parallelism.")
    init_deepspeed_distributed()
    mpu = parallel_state.mpu()

    if stage == 3:
        init_ctx = deepspeed.zero.Init(data_parallel_group=parallel_state.dp_group(), mpu=mpu,
                                       config_dict_or_path=ds, remote_device=_remote_device(ds))
        # No ``dtype=``: DeepSpeed 0.19 then takes it from the config. An explicit dtype is overridden
        # by bf16 on accelerators without fp16 (operator precedence in Init._set_dtype), e.g. the CPU.
    else:
        init_ctx = contextlib.nullcontext()
    # Same initial weights whatever the ZeRO stage (DeepSpeed's set-up above may draw random numbers) and
    # whatever the pipeline layout (every stage builds the whole model like stage 0, then keeps its part).
    parallel_state.seed_everything(cfg.train.seed, per_stage=False)
    with init_ctx:
        model = model_builder()
    if info.pp_size > 1:
        parallel_state.seed_everything(cfg.train.seed)  # back to per-stage streams (dropout)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_builder returned {type(model).__name__}, expected an nn.Module.")
    if stage != 3:
        model.to(info.device)
    if getattr(cfg.train, "compile", False):
        # per Transformer layer, in place (names unchanged), after TP and recompute, before DeepSpeed wraps it
        from heptapod_ds.model.compile import apply_compile
        apply_compile(model, cfg)

    optimizer = build_optimizer(model, cfg, offload=ds_config_mod.is_offload(ds))
    scheduler = build_scheduler(optimizer, cfg)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds, mpu=mpu,
        dist_init_required=False)
    if stage == 0 and info.dp_size == 1:
        # One data-parallel rank has nothing to reduce, but DeepSpeed's ZeRO-0 path would still flatten every
        # gradient into one buffer, scale it, "all-reduce" it over the one-rank group and copy it back:
        # four passes over the gradients per step (about 5% of a small model's CPU step).
        engine.enable_backward_allreduce = False
    if info.pp_size > 1:
        from .step import check_pipeline_engine
        check_pipeline_engine(engine)
    log.info("DeepSpeed engine: ZeRO-%d, %s, micro batch %d x accum %d x dp %d", stage,
             "bf16" if ds["bf16"]["enabled"] else "fp32", ds["train_micro_batch_size_per_gpu"],
             ds["gradient_accumulation_steps"], info.dp_size)
    return engine, ds_optimizer, ds_scheduler


def _remote_device(ds) -> str:
    offload_param = ds["zero_optimization"].get("offload_param", {})
    return "cpu" if offload_param.get("device", "none") == "cpu" else None
