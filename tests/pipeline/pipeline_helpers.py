"""A minimal trainer on the real model for the pipeline tests: any TP x PP x DP, any ZeRO stage.

``train(overrides, steps)`` runs inside a world (a ``run_ranks`` body): the global batch of step s is
drawn from a fixed generator, each data-parallel rank takes its contiguous share, and each image has
its own sample seed, so every layout sees the same images and the same random draws. It returns the
losses, and this rank's parameters joined over TP under full-model names.
"""
from __future__ import annotations

import os

import torch

HEAD_TYPES = ("global", "local", "next")
TOKEN_KINDS = ("discrete", "continuous")


def small_overrides(kind: str, head: str):
    """Tiny sizes: 8x8 grid, width 32, backbone 3 + head 3 layers. The local head places its slots with 2D
    rotary angles, the global head with the learned table: every layout runs both kinds of head positions."""
    tok = ["tokenizer.name=pixel"] if kind == "discrete" else ["tokenizer.name=patch", "tokenizer.channels=1"]
    pos = "rope2d" if head == "local" else "learned"
    return tok + [f"head.type={head}", f"head.pos_embed={pos}", "head.window=6", "head.timesteps=2",
                  "head.supervised=4",
                  "backbone.depth=3", "backbone.width=32", "backbone.num_heads=4", "backbone.class_dropout=0.2",
                  "head.depth=3", "head.width=32", "head.num_heads=4",
                  "diffusion.depth=2", "diffusion.width=32", "diffusion.batch_mul=2", "diffusion.sample_steps=5",
                  "optimizer.lr=3e-3", "schedule.warmup_steps=1", "optimizer.grad_clip=0.5",
                  "optimizer.weight_decay=0.1", "train.ema_decay=0"]


def global_batch(cfg, step: int, size: int):
    g = torch.Generator().manual_seed(1000 + step)
    n = cfg.tokenizer.num_tokens
    if cfg.tokenizer.is_discrete:
        tokens = torch.randint(0, cfg.tokenizer.vocab_size, (size, n), generator=g)
    else:
        tokens = torch.randn(size, n, cfg.tokenizer.channels, generator=g)
    labels = torch.randint(0, cfg.backbone.num_classes + 1, (size,), generator=g)
    seeds = torch.arange(size, dtype=torch.long) + 7919 * step
    return tokens, labels, seeds


def micro_batches(cfg, step: int, info):
    tr = cfg.train
    tokens, labels, seeds = global_batch(cfg, step, tr.global_batch_size)
    per_rank = tr.global_batch_size // info.dp_size
    sl = slice(info.dp_rank * per_rank, (info.dp_rank + 1) * per_rank)
    return list(zip(*(t[sl].split(tr.micro_batch_size) for t in (tokens, labels, seeds))))


def full_params(module):
    """This rank's parameters, TP shards joined (a collective over the TP group)."""
    from heptapod_ds.model.tp_shard import gather_full_state_dict

    named = {n for n, _ in module.named_parameters()}
    return {k: v for k, v in gather_full_state_dict(module).items() if k in named}


def layout(tp: int, pp: int, seed: int = 0):
    """(Re)build the TP x PP groups over the ranks of this world."""
    from heptapod_ds.distributed import parallel_state

    if parallel_state.is_initialized():
        parallel_state.destroy(keep_process_group=True)
    return parallel_state.initialize(tp, pp, seed=seed)


def train(overrides, steps: int, poison=None):
    """``poison=(step, micro)``: that micro batch's loss becomes NaN on the last stage only."""
    from heptapod_ds.config import load_config
    from heptapod_ds.distributed import get_info
    from heptapod_ds.engine import NonFiniteGuard, build_engine, train_step
    from heptapod_ds.model import build_model

    cfg = load_config(overrides=list(overrides), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    info = get_info()
    engine, _, _ = build_engine(cfg, lambda: build_model(cfg))
    initial = full_params(engine.module)
    nf = NonFiniteGuard(cfg.train.max_nonfinite)
    pipeline = info.pp_size > 1
    last_stage = info.pp_rank == info.pp_size - 1
    losses, norms = {}, {}
    for step in range(steps):
        mbs = micro_batches(cfg, step, info)

        def loss_fn(model, mb, _step=step, _mbs=mbs):
            tokens, labels, seeds = mb
            out, _ = model(tokens, labels, sample_seeds=seeds)
            index = next(i for i, m in enumerate(_mbs) if m is mb)
            if poison is not None and last_stage and (_step, index) == tuple(poison):
                out = out * float("nan")
            return out
        result = train_step(engine, mbs, loss_fn, nf, pipeline=pipeline)
        losses[step] = result.loss
        norms[step] = result.grad_norm
    return {"losses": losses, "norms": norms, "params": full_params(engine.module), "initial": initial,
            "skipped": nf.total_skipped, "pp_rank": info.pp_rank, "tp_rank": info.tp_rank,
            "dp_rank": info.dp_rank, "engine": engine, "cfg": cfg}


def strip(result):
    """What leaves a rank (engines and configs stay)."""
    return {k: v for k, v in result.items() if k not in ("engine", "cfg")}


def merge_ranks(results):
    """The full model's parameters from every stage (any TP/DP rank of a stage holds the same)."""
    from heptapod_ds.pipeline.stage import merge_stage_state_dicts

    per_stage = {}
    for r in results:
        per_stage.setdefault(r["pp_rank"], r["params"])
    return merge_stage_state_dicts([per_stage[k] for k in sorted(per_stage)])


def max_relative_difference(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    worst, name = 0.0, None
    for k in a:
        err = float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12))
        if err > worst:
            worst, name = err, k
    return worst, name


def train_resumable(overrides, steps: int, sigterm_rank_after=None):
    """:func:`train` with checkpoints, EMA and the preemption guard, as train.py runs them.

    ``sigterm_rank_after=(rank, step)``: that rank sends itself SIGTERM after that step; every rank then
    saves and stops. A later call on the same ``run_dir`` (``checkpoint.resume=auto``) continues from the
    checkpoint. Batches depend only on the step, so the resumed run sees what the uninterrupted one saw.
    """
    import signal

    from heptapod_ds.config import load_config
    from heptapod_ds.distributed import get_info
    from heptapod_ds.engine import EMA, CheckpointManager, NonFiniteGuard, PreemptionGuard, build_engine, train_step
    from heptapod_ds.model import build_model

    cfg = load_config(overrides=list(overrides), world_size=int(os.environ.get("WORLD_SIZE", "1")))
    info = get_info()
    engine, _, _ = build_engine(cfg, lambda: build_model(cfg))
    ema = EMA(engine, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    ckpt, nf, guard = CheckpointManager(cfg), NonFiniteGuard(cfg.train.max_nonfinite), PreemptionGuard()
    state = ckpt.load(engine, ema=ema)
    step, losses = (state["step"], dict(state["losses"])) if state is not None else (0, {})
    stopped_by = None

    def loss_fn(model, mb):
        tokens, labels, seeds = mb
        return model(tokens, labels, sample_seeds=seeds)[0]
    while step < steps:
        result = train_step(engine, micro_batches(cfg, step, info), loss_fn, nf, ema, pipeline=info.pp_size > 1)
        losses[step] = result.loss
        step += 1
        if sigterm_rank_after is not None and (info.rank, step) == tuple(sigterm_rank_after):
            os.kill(os.getpid(), signal.SIGTERM)
        stop = guard.should_stop()
        if stop or step == steps:
            ckpt.save(engine, step, {"step": step, "losses": losses, "nonfinite": nf.state_dict()}, ema=ema)
        if stop:
            stopped_by = guard.signal_name
            break
    guard.close()
    out = {"losses": losses, "step": step, "stopped_by": stopped_by, "params": full_params(engine.module),
           "pp_rank": info.pp_rank}
    if ema is not None:
        ema.sync()
        out["ema"] = {n: s.clone() for n, s in zip(ema.names, ema.shadow)}
    return out
