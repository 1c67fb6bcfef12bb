"""Memory rows: parameter, gradient and optimizer bytes per rank at DP=2 for ZeRO 0-3.

Counted from the tensors the engine itself holds (not process RSS): the model's parameter storage
(ZeRO-3: each parameter's ``ds_tensor`` partition), the gradients alive after a backward (the
parameters' ``.grad``; ZeRO-2: DeepSpeed's averaged gradient partitions; ZeRO-3: its flat gradient
partition buffer), the optimizer's own copies of what it updates when they are not the model's
parameters (fp32 partitions at ZeRO 1-3) and the optimizer state (AdamW's two moments). Each row also
carries the cost model's prediction (:func:`heptapod_ds.cost.memory.model_state_bytes`).
"""
from __future__ import annotations

from typing import Dict, List

import torch


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views into one flat buffer count it once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _inner_optimizer(opt):
    while hasattr(opt, "optimizer") and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


def engine_bytes(engine, tokens, labels, seeds) -> Dict[str, int]:
    """Bytes of one rank's parameters, gradients (after a backward) and optimizer tensors."""
    model = engine.module
    params = [getattr(p, "ds_tensor", p) for p in model.parameters()]
    loss, _ = engine(tokens, labels, sample_seeds=seeds)
    engine.backward(loss)
    zopt = engine.optimizer
    grads = [p.grad for p in model.parameters()]
    for group in getattr(zopt, "averaged_gradients", {}).values() if isinstance(
            getattr(zopt, "averaged_gradients", None), dict) else []:
        grads.extend(group or [])
    flat = getattr(zopt, "grad_partitions_flat_buffer", None)
    if flat is not None:
        grads.append(flat)
    grad_bytes = _bytes(grads)
    engine.step()
    inner = _inner_optimizer(zopt)
    model_ptrs = {t.untyped_storage().data_ptr() for t in params}
    masters = [p for g in inner.param_groups for p in g["params"] if p.untyped_storage().data_ptr() not in model_ptrs]
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params": _bytes(params), "grads": grad_bytes, "optimizer": _bytes(masters) + _bytes(states)}


def _rank_body(rank: int, world: int, port: int, preset: str, micro_batch: int, queue) -> None:
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from heptapod_ds.distributed import parallel_state
    from heptapod_ds.distributed.launch_env import LaunchEnv
    from heptapod_ds.engine import build_engine
    from heptapod_ds.model import build_model

    from heptapod_ds.config import load_config

    from .train import _batch

    parallel_state.initialize(tensor=1, pipeline=1, backend="gloo", seed=0,
                              launch=LaunchEnv(rank=rank, world_size=world, local_rank=rank,
                                               master_addr="127.0.0.1", master_port=port, launcher="single"))
    out = {}
    for stage in (0, 1, 2, 3):
        cfg = load_config(overrides=[f"preset={preset}", f"parallel.zero_stage={stage}",
                                     f"train.micro_batch_size={micro_batch}",
                                     f"train.global_batch_size={micro_batch * world}", "train.grad_accum=1",
                                     "train.ema_decay=0"], world_size=world)
        engine, _, _ = build_engine(cfg, lambda cfg=cfg: build_model(cfg))
        tokens, labels, seeds = _batch(cfg, micro_batch)
        out[stage] = engine_bytes(engine, tokens, labels, seeds)
        del engine
    queue.put((rank, out))
    parallel_state.destroy()


def run(preset: str, micro_batch: int, timeout: float = 600) -> List[Dict]:
    """Rows ``memory/zero{0..3}`` (per rank, DP=2) from two spawned gloo ranks."""
    import torch.multiprocessing as mp

    from heptapod_ds.distributed.launch_env import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_body, args=(r, 2, port, preset, micro_batch, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, out = queue.get(timeout=timeout)
            results[rank] = out
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    from heptapod_ds.config import load_config
    from heptapod_ds.cost.memory import model_state_bytes

    rows = []
    base = sum(results[0][0].values())
    for stage in (0, 1, 2, 3):
        per_rank = results[0][stage]
        total = sum(per_rank.values())
        cfg = load_config(overrides=[f"preset={preset}", f"parallel.zero_stage={stage}",
                                     f"train.micro_batch_size={micro_batch}",
                                     f"train.global_batch_size={micro_batch * 2}", "train.grad_accum=1"], world_size=2)
        predicted = model_state_bytes(cfg, 2, "fp32")  # the cost model's figure for the same partitions
        rows.append({"row": f"memory/{preset}/zero{stage}", "dp": 2, **{f"{k}_bytes": v for k, v in per_rank.items()},
                     "total_bytes": total, "fraction_of_zero0": total / base,
                     "predicted_total_bytes": sum(predicted.values()),
                     "ranks_agree": results[0][stage] == results[1][stage]})
    return rows
