"""The one place that builds torch.distributed and megatron-core's TP/PP/DP groups.

This is the only module of heptapod_ds with process-wide mutable state. Everything else asks it:
``rank()``, ``dp_rank()``, ``tp_group()`` ... and DeepSpeed gets :class:`MegatronMPU` as ``mpu``.

Rank layout follows megatron-core's default order ``tp-cp-ep-dp-pp``: tensor-parallel peers are
adjacent ranks (fast intra-node links), then data-parallel replicas, then pipeline stages.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import cpu_compat
from .launch_env import LaunchEnv, check_multinode_addresses, detect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelInfo:
    """A snapshot of this rank's place in the parallel layout."""
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    backend: str
    device: torch.device


_INFO: Optional[ParallelInfo] = None
_OWNS_PROCESS_GROUP = False
# the process groups megatron-core created in initialize(); its destroy_model_parallel() only forgets them
_MEGATRON_GROUPS: list = []


def _no_gpu_context() -> str:
    """Where this task runs and which GPUs it was given, for the messages about a missing GPU."""
    import socket

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"host {socket.gethostname()}"
    if "SLURM_PROCID" in os.environ:
        where += f", Slurm task {os.environ['SLURM_PROCID']} of job {os.environ.get('SLURM_JOB_ID', '?')}"
    return f"{where}, CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)}"


def choose_backend(requested: str = "auto") -> str:
    """``nccl`` or ``gloo`` for ``parallel.backend``.

    ``nccl`` without a visible GPU is an error at start-up (a GPU job on a task that got no GPU must not
    train on the CPU for hours). ``auto`` without a GPU takes gloo, with a warning that says so: the
    slurm/ templates pass ``nccl``; CPU runs ask for ``gloo`` and get it without a warning."""
    if requested not in ("auto", "nccl", "gloo"):
        raise ValueError(f"parallel.backend must be auto, nccl or gloo, got {requested!r}")
    has_gpu = torch.cuda.is_available()
    if requested == "auto":
        if has_gpu:
            return "nccl"
        log.warning("parallel.backend=auto: this task sees no GPU (%s); using gloo on the CPU. Set "
                    "parallel.backend=gloo to train on the CPU on purpose, or parallel.backend=nccl to stop "
                    "when a GPU is missing.", _no_gpu_context())
        return "gloo"
    if requested == "nccl" and not has_gpu:
        raise RuntimeError(f"parallel.backend=nccl needs a GPU, but this task sees none ({_no_gpu_context()}). "
                           f"On a GPU job, check --gpus-per-node and the node's driver (nvidia-smi); to run on "
                           f"the CPU on purpose pass parallel.backend=gloo.")
    return requested


def initialize(tensor: int = 1, pipeline: int = 1, backend: str = "auto", seed: int = 0,
               timeout_minutes: int = 30, launch: Optional[LaunchEnv] = None) -> ParallelInfo:
    """Initialize torch.distributed (if needed), megatron-core's groups and every RNG of this rank."""
    global _INFO, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as mps

    if _INFO is not None:
        raise RuntimeError("parallel state is already initialized; call destroy() first.")
    launch = launch or detect()
    backend = choose_backend(backend)
    check_multinode_addresses(launch, backend)
    if launch.world_size % (tensor * pipeline):
        raise RuntimeError(f"world size {launch.world_size} is not divisible by tensor x pipeline = "
                           f"{tensor} x {pipeline}.")
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        cpu_compat.apply()
        device = torch.device("cpu")

    if not dist.is_initialized():
        # DeepSpeed and megatron read these later; they must describe *this* world (a second world in
        # the same process, or a child process, must not inherit a stale port).
        os.environ.update(MASTER_ADDR=launch.master_addr, MASTER_PORT=str(launch.master_port),
                          RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                          LOCAL_RANK=str(launch.local_rank))
        log.info("init torch.distributed: backend=%s rank=%d/%d via %s (%s:%d)", backend, launch.rank,
                 launch.world_size, launch.launcher, launch.master_addr, launch.master_port)
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                                init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        _OWNS_PROCESS_GROUP = True

    before = _live_groups()
    mps.initialize_model_parallel(tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
                                  distributed_timeout_minutes=timeout_minutes,
                                  create_gloo_process_groups=backend != "gloo")
    _MEGATRON_GROUPS[:] = [g for g in _live_groups() if g not in before]
    _INFO = ParallelInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=launch.local_rank,
        tp_rank=mps.get_tensor_model_parallel_rank(), tp_size=mps.get_tensor_model_parallel_world_size(),
        pp_rank=mps.get_pipeline_model_parallel_rank(), pp_size=mps.get_pipeline_model_parallel_world_size(),
        dp_rank=mps.get_data_parallel_rank(), dp_size=mps.get_data_parallel_world_size(),
        backend=backend, device=device)
    seed_everything(seed)
    return _INFO


def _live_groups() -> list:
    """The process groups torch holds now (its registry of groups; a group compares by identity)."""
    from torch.distributed import distributed_c10d

    return list(distributed_c10d._world.pg_map) if dist.is_initialized() else []


def _destroy_megatron_groups() -> None:
    """Destroy the groups megatron-core made in :func:`initialize`.

    megatron's ``destroy_model_parallel`` only drops its references; torch keeps every group alive, each
    with its own threads (gloo: a TCP loop and two run loops per group, about 17 groups per layout).
    A process that builds one layout after another (the conversion tool's tests, a reshard in-process)
    ended with 800+ threads per rank whose wake-ups took most of a 2-core machine.
    """
    alive = set(_live_groups())
    for group in _MEGATRON_GROUPS:
        if group in alive:
            dist.destroy_process_group(group)
    _MEGATRON_GROUPS.clear()


def seed_everything(seed: int, per_stage: bool = True) -> None:
    """Seed Python, numpy and torch for this rank, megatron-style.

    The default generator differs across pipeline stages (seed + 100 * pp_rank) and is shared by
    TP peers and DP replicas, so that TP peers draw identical noise; tensor-parallel regions fork a
    per-TP-rank state (seed + 2718 + tp_rank) through megatron's RNG tracker. ``per_stage=False``
    seeds every stage like stage 0: each stage then builds the whole model with the weights of a
    PP=1 run before keeping its own part.
    """
    info = get_info()
    stage_seed = seed + 100 * info.pp_rank if per_stage else seed
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(stage_seed)
    else:
        cpu_compat.seed_model_parallel_rng(stage_seed, info.tp_rank)


def destroy(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and, if we created it, the default process group (unless
    ``keep_process_group``: then ``initialize`` may build another TP/PP layout over the same ranks)."""
    global _INFO, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as mps

    mps.destroy_model_parallel()
    _destroy_megatron_groups()
    if keep_process_group:
        _INFO = None
        return
    if _OWNS_PROCESS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
    _INFO = None


def is_initialized() -> bool:
    return _INFO is not None


def get_info() -> ParallelInfo:
    if _INFO is None:
        raise RuntimeError("parallel state is not initialized; call heptapod_ds.distributed.initialize() first.")
    return _INFO


def rank() -> int:
    return get_info().rank


def is_rank0() -> bool:
    return _INFO is None or _INFO.rank == 0


def device() -> torch.device:
    return get_info().device


def tp_group():
    from megatron.core import parallel_state as mps
    return mps.get_tensor_model_parallel_group()


def pp_group():
    from megatron.core import parallel_state as mps
    return mps.get_pipeline_model_parallel_group()


def dp_group():
    from megatron.core import parallel_state as mps
    return mps.get_data_parallel_group()


def is_first_stage() -> bool:
    return get_info().pp_rank == 0


def is_last_stage() -> bool:
    info = get_info()
    return info.pp_rank == info.pp_size - 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class MegatronMPU:
    """The ``mpu`` object DeepSpeed expects, backed by megatron-core's parallel_state.

    DeepSpeed 0.19 calls the methods below. The model-parallel group is megatron's TP x PP group, so
    the gradient norm (and clipping, and the overflow check) is summed over every stage and TP rank.
    ``get_model_parallel_rank`` returns the *tensor* parallel rank: ZeRO uses it to count
    TP-replicated parameters (LayerNorm) once per stage in the gradient norm; stages hold disjoint
    parameters, so each stage's TP rank 0 counts its own. ``get_model_parallel_world_size`` stays the TP
    size: DeepSpeed names and loads one ``mp_rank_XX`` file per TP rank of each stage's engine. There is deliberately no ``get_sequence_parallel_*``: if present, DeepSpeed ignores the
    DP/MP groups given here.
    """

    def __init__(self):
        from megatron.core import parallel_state as mps
        self._mps = mps

    def get_data_parallel_group(self):
        return self._mps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self._mps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self._mps.get_data_parallel_rank()

    def get_model_parallel_group(self):
        return self._mps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        # DeepSpeed reads this as the number of mp_rank_XX checkpoint files per engine (one per TP rank;
        # each pipeline stage saves apart); the norm reductions use the group above.
        return self._mps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self._mps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_group(self):
        return self._mps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_world_size(self):
        return self._mps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_rank(self):
        return self._mps.get_tensor_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self._mps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_world_size(self):
        return self._mps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self._mps.get_pipeline_model_parallel_rank()


def mpu() -> MegatronMPU:
    get_info()
    return MegatronMPU()
