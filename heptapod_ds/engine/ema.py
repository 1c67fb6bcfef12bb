"""Exponential moving average of the weights that works under every ZeRO stage and TP.

Choice: each rank keeps an fp32 shadow of exactly the parameter data it owns, so an update is a
local ``lerp`` with no communication:

- ZeRO-0/1/2: the module holds full parameters (this rank's TP shard of them); the shadow mirrors
  them. All data-parallel replicas hold the same shadow, and only data-parallel rank 0 needs to
  save it (``partitioned`` is False).
- ZeRO-3: the module holds 1-D partitions (``param.ds_tensor``); the shadow mirrors this rank's
  partition, so the EMA costs 4 bytes per parameter *per data-parallel group*, not per rank, and
  every rank saves its own piece (``partitioned`` is True).

The shadow follows DeepSpeed's fp32 master weights, not the module's copy: on a bf16 run the
module holds the master rounded to bf16 (8 bits of mantissa), and a per-step change below that
resolution never reaches it, so an EMA of the bf16 copy averages the rounding, not the training.
Where the master lives:

- ZeRO-3: ``safe_get_local_fp32_param`` gives this rank's fp32 partition, the shape of its shadow;
- bf16 ZeRO-0 (DeepSpeed's ``FP16_UnfusedOptimizer`` in bf16): a full fp32 copy of every parameter in
  ``optimizer.fp32_groups``, replicated like the module (looked up by position at each use, so a
  checkpoint load that refills those tensors is followed);
- ZeRO-1/2 and DeepSpeed's ``BF16_Optimizer``: each parameter has an ``_hp_mapping`` whose
  fp32 fragment (a contiguous piece of the flattened parameter, on one data-parallel rank) is updated
  locally; the full shadow is made whole by :meth:`EMA.sync` (one all-reduce over the data-parallel
  group, only before a save or a swap, never per step);
- fp32 ZeRO-0: the module's parameters are the master.
On an fp32 run the master and the module hold the same numbers, so the EMA is the same either way.

:meth:`EMA.swap` puts the averaged weights into the live model and restores the trained weights
afterwards, bit-exactly. Under ZeRO-3 it writes the partitions and re-gathers the parameters that
ZeRO keeps gathered (``stage3_param_persistence_threshold``), so forward passes inside the
``with`` block see only EMA weights.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
from torch import nn


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_tensor")


def _local_data(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns for ``param``: its ZeRO-3 partition, or the parameter itself."""
    return param.ds_tensor.data if _is_zero3(param) else param.data


def _regather_if_available(param: torch.Tensor) -> None:
    """Refresh the full data of a ZeRO-3 parameter that is currently gathered from its partitions."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if not _is_zero3(param) or param.ds_status != ZeroParamStatus.AVAILABLE:
        return
    group = param.ds_process_group
    part = param.ds_tensor.data.contiguous()
    chunks = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, part, group=group)
    full = torch.cat(chunks)[:param.ds_numel]
    param.data.copy_(full.view(param.ds_shape).to(param.dtype))


def _master(param: torch.Tensor):
    """(fp32 master data this rank holds for ``param``, flat offset into the shadow) or None if it holds none.

    ``None`` as the tensor means: the module's own data is the master (fp32 ZeRO-0, or no DeepSpeed)."""
    if _is_zero3(param) and hasattr(param, "_z3_optimizer"):
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param)
        if local is not None and local.numel() == param.ds_tensor.numel():
            return local, 0
        return None, 0
    mapping = getattr(param, "_hp_mapping", False)
    if mapping is False:  # no DeepSpeed fp32 master for this parameter
        return None, 0
    if mapping is None:  # ZeRO-1/2: another data-parallel rank holds all of this parameter's master
        return "elsewhere", 0
    return mapping.hp_fragment, mapping.lp_fragment_address.start


def _unfused_masters(engine) -> Dict[int, tuple]:
    """id(module parameter) -> (optimizer, group, index) of its fp32 master under DeepSpeed's
    ``FP16_UnfusedOptimizer`` (bf16 ZeRO-0), whose parameters carry no ``_hp_mapping``; empty otherwise."""
    optimizer = getattr(engine, "optimizer", None)
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not isinstance(low, list) or not isinstance(high, list) or len(low) != len(high):
        return {}
    found = {}
    for g, (lows, highs) in enumerate(zip(low, high)):
        if not isinstance(lows, list) or not isinstance(highs, list) or len(lows) != len(highs):
            return {}  # not the unfused layout (ZeRO-1/2 keep flat groups under these names)
        for i, (lp, hp) in enumerate(zip(lows, highs)):
            if not (isinstance(lp, torch.Tensor) and isinstance(hp, torch.Tensor) and lp.shape == hp.shape):
                return {}
            found[id(lp)] = (optimizer, g, i)
    return found


class EMA:
    """fp32 shadow of this rank's parameter data; ``update()`` after every applied optimizer step."""

    def __init__(self, engine, decay: float, follow: str = "master"):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}; train.ema_decay=0 means: "
                             f"build no EMA.")
        module: nn.Module = getattr(engine, "module", engine)
        self.decay = float(decay)
        self.num_updates = 0
        self._named: List = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not self._named:
            raise ValueError("EMA: the model has no trainable parameters.")
        self.partitioned = any(_is_zero3(p) for _, p in self._named)
        if follow not in ("master", "module"):
            raise ValueError(f"follow={follow!r}: 'master' (DeepSpeed's fp32 weights) or 'module' (the module's "
                             f"own, possibly bf16, parameters)")
        self.follow = follow
        self._unfused = _unfused_masters(engine) if follow == "master" else {}
        with torch.no_grad():
            self.shadow: List[torch.Tensor] = [_local_data(p).detach().float().clone()
                                               for _, p in self._named]
        # parameters whose master is split over the data-parallel ranks (ZeRO-1/2, bf16 ZeRO-0)
        self._fragmented = follow == "master" and any(
            getattr(p, "_hp_mapping", False) is not False and not _is_zero3(p) for _, p in self._named)
        self._dirty = False
        if follow == "master":  # start from the master too, not from its bf16 rounding
            with torch.no_grad():
                for shadow, (_, p) in zip(self.shadow, self._named):
                    master, start = self._master(p)
                    if isinstance(master, torch.Tensor):
                        shadow.view(-1).narrow(0, start, master.numel()).copy_(master.detach().view(-1))
            self._dirty = self._fragmented

    def _master(self, param: torch.Tensor):
        where = self._unfused.get(id(param))
        if where is not None:
            optimizer, group, index = where
            return optimizer.fp32_groups[group][index], 0
        return _master(param)

    @property
    def names(self) -> List[str]:
        return [n for n, _ in self._named]

    def current_decay(self) -> float:
        """The decay of the next update: ``min(decay, (1 + n) / (10 + n))`` after n updates.

        Without this warm-up an EMA of decay 0.999 still holds 67% of the *initial* random weights
        after 400 steps, and short runs sample from noise; long runs reach ``decay`` after a few
        thousand steps and are unaffected.
        """
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- d * shadow + (1 - d) * weights with d = current_decay() (local data, no communication)."""
        weight = 1.0 - self.current_decay()
        for shadow, (_, p) in zip(self.shadow, self._named):
            master, start = self._master(p) if self.follow == "master" else (None, 0)
            if master is None:
                shadow.lerp_(_local_data(p).float(), weight)
            elif isinstance(master, torch.Tensor):
                piece = shadow.view(-1).narrow(0, start, master.numel())
                piece.lerp_(master.detach().view(-1).to(piece.device, torch.float32), weight)
        self._dirty = self._fragmented
        self.num_updates += 1

    @torch.no_grad()
    def sync(self) -> None:
        """Make every rank's shadow whole where each rank updated only its fragment of the master.

        Collective over the data-parallel group when needed (ZeRO-1/2 or bf16 ZeRO-0), a no-op otherwise;
        call it on every rank before :meth:`state_dict` (:meth:`swap` calls it itself)."""
        if not self._fragmented:
            return
        from heptapod_ds.distributed import parallel_state

        group = parallel_state.dp_group() if dist.is_initialized() else None
        if group is None or dist.get_world_size(group) == 1:
            self._dirty = False
            return
        # In place, one parameter at a time: each rank zeroes what it does not own and the sum over the
        # data-parallel ranks makes the shadow whole. No full-size temporary (a concatenated copy of every
        # shadow was ~7.5 GB for preset H at each save).
        for shadow, (_, p) in zip(self.shadow, self._named):
            master, start = _master(p)
            if master is None:  # not split (replicated on every rank): nothing to gather
                continue
            flat = shadow.view(-1)
            if isinstance(master, torch.Tensor):
                flat[:start].zero_()
                flat[start + master.numel():].zero_()
            else:  # this rank holds none of it
                flat.zero_()
            dist.all_reduce(shadow, group=group)
        self._dirty = False

    def state_dict(self) -> Dict:
        if self._dirty:
            raise RuntimeError("EMA.state_dict() after update() without sync(): call ema.sync() on every rank "
                               "first (ZeRO-1/2 keep the fp32 master split over the data-parallel ranks).")
        return {"decay": self.decay, "num_updates": self.num_updates, "partitioned": self.partitioned,
                "names": self.names, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: Dict) -> None:
        if state["names"] != self.names:
            missing = sorted(set(self.names) - set(state["names"]))[:3]
            extra = sorted(set(state["names"]) - set(self.names))[:3]
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {extra}.")
        if bool(state["partitioned"]) != self.partitioned:
            raise ValueError(f"EMA state was saved {'with' if state['partitioned'] else 'without'} ZeRO-3 "
                             f"partitioning but the model is {'' if self.partitioned else 'not '}"
                             f"partitioned; "
                             f"convert the checkpoint (tools/convert_ckpt.py) to change the ZeRO layout.")
        for name, mine, saved in zip(self.names, self.shadow, state["shadow"]):
            if mine.shape != saved.shape:
                raise ValueError(f"EMA state of '{name}' has shape {tuple(saved.shape)}, the model's local "
                                 f"data {tuple(mine.shape)}: the checkpoint has another parallel layout or "
                                 f"model shape.")
            mine.copy_(saved)
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])

    @contextlib.contextmanager
    def swap(self, engine=None) -> Iterator[None]:
        """Inside the block the model holds the EMA weights; the trained weights come back after it."""
        self.sync()
        backup = []
        with torch.no_grad():
            for shadow, (_, p) in zip(self.shadow, self._named):
                local = _local_data(p)
                backup.append(local.clone())
                local.copy_(shadow.to(local.dtype))
                _regather_if_available(p)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, (_, p) in zip(backup, self._named):
                    _local_data(p).copy_(saved)
                    _regather_if_available(p)
