"""A small stand-in for the Heptapod model: embedding, LayerNorm, megatron TP linears, plain head.

It exercises TP-sharded (column/row-parallel) and TP-replicated (LayerNorm, embedding, head)
parameters, biases (no decay) and an embedding (no decay), which is all the engine cares about.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, WIDTH, SEQ = 32, 16, 6


class StandIn(nn.Module):
    def __init__(self, tp: int = 1, width: int = WIDTH, vocab: int = VOCAB):
        super().__init__()
        from megatron.core import ModelParallelConfig
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        mp = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 perform_initialization=True, params_dtype=torch.float32)
        init = lambda w: nn.init.normal_(w, std=0.2)  # noqa: E731
        self.embed = nn.Embedding(vocab, width)
        self.norm1 = nn.LayerNorm(width)
        self.fc1 = ColumnParallelLinear(width, 4 * width, config=mp, init_method=init, bias=True,
                                        gather_output=False)
        self.fc2 = RowParallelLinear(4 * width, width, config=mp, init_method=init, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)
        self.norm2 = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)
        self.gain = nn.Parameter(torch.ones(width))

    def no_weight_decay(self):
        return ["gain"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.embed(tokens))
        a, _ = self.fc1(h)
        h2, _ = self.fc2(F.gelu(a))
        h = self.norm2(h + h2) * self.gain
        return self.out(h)


def loss_fn(engine, batch) -> torch.Tensor:
    """Mean next-token cross-entropy (a mean, so DeepSpeed's gradient averaging matches 1 rank)."""
    tokens = batch
    logits = engine(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def global_batch(step: int, size: int) -> torch.Tensor:
    """A deterministic synthetic global batch of token sequences for ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (size, SEQ), generator=g)


def local_micro_batches(step: int, global_size: int, dp_rank: int, dp_size: int, grad_accum: int):
    """This DP rank's micro batches of the global batch of ``step`` (contiguous shards)."""
    full = global_batch(step, global_size)
    per_rank = global_size // dp_size
    mine = full[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return list(mine.chunk(grad_accum))


def run_training(overrides, until_step: int, signal_rank_at=None, kill_in_save_at=None, poison=()):
    """A minimal trainer on the engine API; call inside an initialized world (run_ranks body or script).

    - the global batch of each step is drawn from the torch RNG (so exact resume needs the RNG restored);
    - ``signal_rank_at=(rank, step)`` sends SIGUSR1 to that rank after that step (preemption);
    - ``kill_in_save_at=step`` SIGKILLs the process in the middle of saving that step;
    - ``poison``: (step, micro index[, times]) whose loss is made NaN (once, or ``times`` tries).
    Returns losses per step, the final full parameters, the EMA'd full parameters and timings.
    """
    import os
    import signal

    from heptapod_ds.config import load_config
    from heptapod_ds.distributed import get_info, initialize
    from heptapod_ds.distributed.parallel_state import is_initialized
    from heptapod_ds.engine import (EMA, CheckpointManager, NonFiniteGuard, PreemptionGuard, build_engine,
                                    train_step)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(overrides=list(overrides), world_size=world)
    if not is_initialized():
        initialize(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.train.seed)
    info = get_info()
    engine, _, _ = build_engine(cfg, lambda: StandIn(tp=cfg.parallel.tensor))
    ema = EMA(engine, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    ckpt = CheckpointManager(cfg)
    nf = NonFiniteGuard(cfg.train.max_nonfinite)
    guard = PreemptionGuard()
    state = ckpt.load(engine, ema=ema)
    step, losses = 0, {}
    if state is not None:
        step, losses = state["step"], dict(state["losses"])
        nf.load_state_dict(state["nonfinite"])
    gas = cfg.train.grad_accum
    pending = {(p[0], p[1]): (p[2] if len(p) > 2 else 1) for p in poison}
    stopped_by = None
    if kill_in_save_at is not None:
        real_save = torch.save

        def killing_save(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            if f"global_step{kill_in_save_at}" in str(path) and "heptapod_rank" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killing_save
    while step < until_step:
        # the batch index is drawn from the RNG: a resume that forgot the RNG state would diverge
        draw = int(torch.randint(0, 10**6, (1,)).item())
        mbs = local_micro_batches(draw, cfg.train.global_batch_size, info.dp_rank, info.dp_size, gas)
        poisoned = set()
        for key in [k for k in pending if k[0] == step and pending[k] > 0]:
            pending[key] -= 1
            poisoned.add(key[1])
        fn = (lambda e, mb, _p=poisoned, _m=mbs: loss_fn(e, mb) * (float("nan") if any(
            mb is _m[i] for i in _p) else 1.0))
        result = train_step(engine, mbs, fn, nf, ema)
        if nf.should_stop:
            ckpt.save(engine, step, {"step": step, "losses": losses, "nonfinite": nf.state_dict()}, ema=ema)
            raise nf.error(step)
        if not result.skipped:
            losses[step] = result.loss
            step += 1
        if signal_rank_at is not None and (info.rank, step) == tuple(signal_rank_at):
            os.kill(os.getpid(), signal.SIGUSR1)
        stop = guard.should_stop()
        save_now = cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and not result.skipped
        if stop or save_now or step == until_step:
            ckpt.save(engine, step, {"step": step, "losses": losses, "nonfinite": nf.state_dict()}, ema=ema)
        if stop:
            stopped_by = guard.signal_name
            break
    guard.close()
    params = full_params(engine)
    ema_params = None
    if ema is not None:
        with ema.swap(engine):
            ema_params = full_params(engine)
    return {"losses": losses, "params": params, "ema": ema_params, "step": step, "stopped_by": stopped_by,
            "skipped": nf.total_skipped, "save_s": ckpt.last_save_seconds, "load_s": ckpt.last_load_seconds}


def full_params(engine):
    """Full fp32 numpy copies of all parameters (gathered under ZeRO-3; this rank's TP shard otherwise)."""
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_tensor")):
            out[name] = p.detach().float().clone().numpy()  # numpy: pickles by value across processes
    return out
