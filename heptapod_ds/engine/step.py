"""One optimizer step, two ways: micro-batches one after the other (PP = 1), or through Megatron-core's
1F1B pipeline schedule with one DeepSpeed engine per stage (PP > 1).

Both keep the same contract (:class:`StepResult`, the non-finite guard, the EMA update) so the trainer
does not care which runs.

One host read per optimizer step. The losses and their non-finite flag stay on the device through the
step's micro-batches and are reduced there; the step then reads them to the host once, as one small
tensor, to decide: a non-finite loss on any micro-batch of any rank skips the step on every rank through
the discard path (gradients dropped, counters rewound, no optimizer, scheduler or EMA update). The
gradient norm stays a device tensor until someone asks for it (:attr:`StepResult.grad_norm`; the trainer
asks on logged steps). Without a pipeline the decision comes after the last micro-batch's backward and
before ``engine.step()``; under the 1F1B schedule it comes after the schedule, before any gradient
leaves the rank (inside ``coalesce_grad_reduction`` nothing has been reduced yet).

Gradient reduction under PP, once per optimizer step whatever the precision: ZeRO-1/2 (fp32, and bf16 with
DeepSpeed's default bf16 gradients) run the schedule inside ``engine.coalesce_grad_reduction()`` (the
gradients of all micro-batches accumulate locally and are reduced once on leaving it). ZeRO-0 (fp32: the
torch optimizer; bf16: DeepSpeed's ``FP16_UnfusedOptimizer`` holding the fp32 master) and DeepSpeed's
``BF16_Optimizer`` (ZeRO-1 with ``data_types.grad_accum_dtype=fp32``) have no such hook: the schedule's
backward passes accumulate into ``param.grad`` (``BF16_Optimizer``: into its fp32 buffers through the hooks
of ``bf16.immediate_grad_update``), and the step reduces them itself with ``engine.allreduce_gradients()``
after the schedule. The loss of each micro-batch is divided by the number of micro-batches by the schedule,
and DeepSpeed sees one "micro-batch" per schedule (``gradient_accumulation_steps=1``, see
``ds_config.resolve``), so every ``engine.step()`` is an optimizer step. The gradient norm DeepSpeed clips
with is global: its model-parallel group is TP x PP (``parallel_state.MegatronMPU``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .guards import NonFiniteGuard


class StepResult:
    """What one optimizer step did.

    ``loss``: mean loss over the global batch (NaN when skipped); ``skipped``: skipped for a non-finite loss;
    ``lr``: the learning rate the step used."""

    def __init__(self, loss: float, skipped: bool, lr: float, grad_norm=None):
        self.loss, self.skipped, self.lr = loss, skipped, lr
        self._grad_norm = grad_norm

    @property
    def grad_norm(self) -> Optional[float]:
        """Global gradient norm before clipping (None when skipped / unknown); read from the device here."""
        return None if self._grad_norm is None else float(self._grad_norm)


def train_step(engine, micro_batches: Sequence, loss_fn: Callable, nonfinite: NonFiniteGuard, ema=None,
               pipeline: bool = False) -> StepResult:
    """One optimizer step over one step's micro batches, with non-finite skipping.

    ``loss_fn(model, micro_batch) -> tensor``: the scalar mean loss (PP = 1: ``model`` is the engine;
    PP > 1: the stage module, and the tensor is the stage's output, the loss on the last stage).
    ``pipeline=True`` runs Megatron's 1F1B schedule over all micro batches (every stage calls it).
    """
    if pipeline:
        return _pipeline_step(engine, micro_batches, loss_fn, nonfinite, ema)
    return _sequential_step(engine, micro_batches, loss_fn, nonfinite, ema)


# ---------------------------------------------------------------------------------------- PP = 1

def _sequential_step(engine, micro_batches, loss_fn, nonfinite, ema) -> StepResult:
    gas = engine.gradient_accumulation_steps()
    if len(micro_batches) != gas:
        raise ValueError(f"train_step got {len(micro_batches)} micro batches, DeepSpeed accumulates {gas} "
                         f"(train.grad_accum); pass exactly one optimizer step's worth.")
    lr = float(engine.get_lr()[0])
    counters = (engine.micro_steps, engine.global_samples)
    total, bad = None, None
    for i, mb in enumerate(micro_batches):
        loss = loss_fn(engine, mb)
        value = loss.detach()
        flag = ~torch.isfinite(value)
        total = value.double() if total is None else total + value.double()
        bad = flag if bad is None else bad | flag
        engine.backward(loss)
        if i < gas - 1:
            engine.step()  # not an accumulation boundary: DeepSpeed only advances its micro-step counters
    mean, skip = _vote(_dp_mean(total / gas), bad)
    if skip:
        _drop_local_gradients(engine)
        _discard_gradients(engine, counters, reset_micro_step=True)
        nonfinite.record(False)
        return StepResult(loss=math.nan, skipped=True, lr=lr)
    pre_step_norm = _zero0_grad_norm(engine) if engine.zero_optimization_stage() == 0 else None
    engine.step()
    nonfinite.record(True)
    if ema is not None:
        ema.update()
    norm = engine.get_global_grad_norm()
    if norm is None and engine.zero_optimization_stage() == 0:
        norm = pre_step_norm  # DeepSpeed's ZeRO-0 path computes the norm to clip but discards it
    return StepResult(loss=mean, skipped=False, lr=lr, grad_norm=norm)


# ---------------------------------------------------------------------------------------- PP > 1

def check_pipeline_engine(engine) -> None:
    """Refuse, at build time, a DeepSpeed engine whose gradients this module cannot step under PP.

    What DeepSpeed 0.19.8 builds, and how :func:`_pipeline_step` reduces it once per optimizer step:

    - ZeRO-1/2, fp32 or bf16 with bf16 gradient accumulation (the default): ``DeepSpeedZeroOptimizer``;
      the schedule runs inside ``coalesce_grad_reduction()``.
    - ZeRO-1, bf16 with ``data_types.grad_accum_dtype=fp32`` in the JSON: ``BF16_Optimizer``, which has no
      coalescing hook. With ``bf16.immediate_grad_update`` its hooks add each micro-batch's gradient into
      the fp32 buffers as the schedule's backward produces it (fp32 accumulation, as at PP = 1), and the
      step reduces those buffers itself. Without it, the buffers are filled only from ``engine.backward``,
      which the schedule does not call: refused.
    - ZeRO-0 fp32: the torch optimizer; ZeRO-0 bf16: ``FP16_UnfusedOptimizer`` in bf16 (fp32 master, bf16
      gradients); the step reduces the accumulated gradients itself.
    """
    stage = engine.zero_optimization_stage()
    name = type(engine.optimizer).__name__
    if stage == 3:
        raise ValueError("ZeRO-3 with pipeline parallelism deadlocks (parameters are gathered inside each "
                         "forward); use parallel.zero_stage=2, 1 or 0.")
    if _is_bf16_optimizer(engine) and not engine.optimizer.immediate_grad_update:
        raise ValueError(f"pipeline parallelism with DeepSpeed's BF16_Optimizer (ZeRO-{stage}, data_types."
                         f"grad_accum_dtype=fp32) needs \"bf16\": {{\"immediate_grad_update\": true}} in the DeepSpeed "
                         f"JSON: the schedule's backward passes reach its fp32 gradient buffers only through the "
                         f"hooks that setting installs.")
    if stage in (1, 2) and not (hasattr(engine.optimizer, "_coalesce_grad_reduction") or _is_bf16_optimizer(engine)):
        raise ValueError(f"pipeline parallelism with ZeRO-{stage}: DeepSpeed wrapped the optimizer in {name}, "
                         f"whose gradient reduction this step cannot drive over the schedule's micro-batches; use "
                         f"the ds_configs/zero{stage}.json defaults (no \"data_types\" section), or "
                         f"parallel.precision=fp32.")
    if stage == 0 and not (isinstance(engine.optimizer, torch.optim.Optimizer) or _is_bf16_unfused(engine)):
        raise ValueError(f"pipeline parallelism with ZeRO-0 needs a plain fp32 optimizer or DeepSpeed's bf16 "
                         f"FP16_UnfusedOptimizer, DeepSpeed made a {name}; use parallel.zero_stage=1 or 2, or "
                         f"parallel.precision=fp32.")


def _is_bf16_optimizer(engine) -> bool:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(engine.optimizer, BF16_Optimizer)


def _is_bf16_unfused(engine) -> bool:
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return (isinstance(engine.optimizer, FP16_UnfusedOptimizer)
            and engine.optimizer.low_precision_dtype == torch.bfloat16)


def _pipeline_step(engine, micro_batches, loss_fn, nonfinite, ema) -> StepResult:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from heptapod_ds.distributed import cpu_compat, parallel_state

    info = parallel_state.get_info()
    module = engine.module
    stage = engine.zero_optimization_stage()
    lr = float(engine.get_lr()[0])
    counters = (engine.micro_steps, engine.global_samples)
    module.config.pipeline_dtype = next(module.parameters()).dtype  # what the stages send (bf16 on GPU)
    losses: List[torch.Tensor] = []

    def forward_step(data_iterator, model):
        out = loss_fn(model, next(data_iterator))

        def reduce(output):
            loss = output.detach().clone()  # the schedule divides ``output`` in place afterwards
            losses.append(loss)
            return output, {"loss": loss}
        return out, reduce

    first = micro_batches[0]
    coalesced = stage in (1, 2) and hasattr(engine.optimizer, "_coalesce_grad_reduction")
    coalesce = engine.coalesce_grad_reduction() if coalesced else contextlib.nullcontext()
    with coalesce:
        with cpu_compat.cuda_factories_on_cpu():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(micro_batches), model=module,
                num_microbatches=len(micro_batches), seq_length=int(first[0].shape[1]),
                micro_batch_size=int(first[0].shape[0]), forward_only=False)
        # only the last stage measured losses; every stage joins the vote
        device = first[0].device
        local = torch.stack(losses).double().mean() if losses else torch.zeros((), dtype=torch.float64,
                                                                                device=device)
        bad = (~torch.isfinite(local)) if losses else torch.zeros((), dtype=torch.bool, device=device)
        mean, skip = _vote(_from_last_stage(_dp_mean(local) if info.pp_rank == info.pp_size - 1 else local), bad)
        if skip:
            _drop_local_gradients(engine)  # before leaving the block: nothing is reduced
    if skip:
        _discard_gradients(engine, counters, reset_micro_step=True)
        nonfinite.record(False)
        return StepResult(loss=math.nan, skipped=True, lr=lr)
    pre_step_norm = None
    if not coalesced:
        engine.allreduce_gradients()  # one reduction over the data-parallel group per optimizer step
        if stage == 0:
            pre_step_norm = _zero0_grad_norm(engine)
    engine.step()
    nonfinite.record(True)
    if ema is not None:
        ema.update()
    norm = engine.get_global_grad_norm()
    if norm is None and stage == 0:
        norm = pre_step_norm
    return StepResult(loss=mean, skipped=False, lr=lr, grad_norm=norm)


def _collective(t: torch.Tensor, group=None) -> torch.Tensor:
    """``t`` where the group's backend reduces (NCCL: the GPU; gloo: where it is)."""
    if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
        return t.cuda()
    return t


def _from_last_stage(value: torch.Tensor) -> torch.Tensor:
    """The last stage's value on every stage (a broadcast over the pipeline group), left on the device."""
    from heptapod_ds.distributed import parallel_state

    group = parallel_state.pp_group()
    t = _collective(value.to(torch.float64).reshape(1).clone(), group)
    dist.broadcast(t, src=dist.get_global_rank(group, dist.get_world_size(group) - 1), group=group)
    return t[0]


def _vote(mean: torch.Tensor, bad: torch.Tensor) -> Tuple[float, bool]:
    """The step's one host read: (mean loss, whether any rank saw a non-finite loss).

    The flag is reduced with MAX over every rank (all stages, TP and DP peers) on the device first."""
    flag = bad.to(torch.float32).reshape(1)
    if dist.is_initialized():
        flag = _collective(flag)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    mean_v, bad_v = torch.cat([mean.reshape(1).double(), flag.double()]).cpu().tolist()  # both on one device
    return mean_v, bad_v > 0


def _drop_local_gradients(engine) -> None:
    for p in engine.module.parameters():
        p.grad = None
        if hasattr(p, "grad_accum"):
            p.grad_accum = None
    if _is_bf16_optimizer(engine):
        engine.optimizer.clear_hp_grads()  # what immediate_grad_update already moved to fp32


# ---------------------------------------------------------------------------------------- shared

def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over the data-parallel group, on the device (summed in fp32, as the logged losses always were)."""
    if not dist.is_initialized():
        return value
    from heptapod_ds.distributed import parallel_state

    group = parallel_state.dp_group()
    t = _collective(value.to(torch.float32).reshape(()), group)
    dist.all_reduce(t, group=group)
    return t.double() / dist.get_world_size(group)


def _zero0_grad_norm(engine) -> torch.Tensor:
    """Global gradient norm of the averaged gradients, TP-replicated parameters counted once (on the
    device: :attr:`StepResult.grad_norm` reads it when asked)."""
    from deepspeed.runtime.utils import clip_grad_norm_

    params = [p for p in engine.module.parameters() if p.grad is not None]
    return clip_grad_norm_(params, max_norm=float("inf"), mpu=engine.mpu)


def _discard_gradients(engine, counters, reset_micro_step: bool = False) -> None:
    """Drop gradients accumulated by earlier micro batches of an abandoned step; rewind the counters.

    ``reset_micro_step``: the pipeline step left ZeRO-1/2's reduction of this step flushed but not
    stepped; reset its micro-step id as its ``step()`` would, so the next flush copies, not adds."""
    stage = engine.zero_optimization_stage()
    opt = engine.optimizer
    if stage == 3:
        opt._overflow_clean_up(None)  # what ZeRO-3 does after an fp16 overflow: clear grad partitions
    elif stage in (1, 2):
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        for k in list(getattr(opt, "averaged_gradients", {}).keys()):
            opt.averaged_gradients[k] = None
        for k in list(getattr(opt, "all_grad_tensors", {}).keys()):
            opt.all_grad_tensors[k] = None
        if getattr(opt, "cpu_offload", False):
            opt.reset_cpu_buffers()
        if reset_micro_step and hasattr(opt, "micro_step_id"):
            # what ZeRO-1/2's step() does first: the next step must not accumulate onto this one
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID
            opt.micro_step_id = INITIAL_MICRO_STEP_ID
    engine.zero_grad()
    engine.micro_steps, engine.global_samples = counters
