"""The engine builder's speed settings keep the numbers: a one-rank data-parallel group skips DeepSpeed's
(no-op) gradient reduction."""
import torch

from heptapod_ds.config import load_config


def _cfg(stage: int):
    return load_config(overrides=["preset=tiny", f"parallel.zero_stage={stage}", "train.micro_batch_size=4",
                                  "train.global_batch_size=4", "train.grad_accum=1", "train.ema_decay=0",
                                  "logging.wandb_mode=disabled"], world_size=1)


def _batch(cfg):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.tokenizer.vocab_size, (4, cfg.tokenizer.num_tokens), generator=g)
    return tokens, torch.randint(0, 10, (4,), generator=g), torch.arange(4)


def _step(engine, cfg):
    from heptapod_ds.engine import NonFiniteGuard, train_step

    tokens, labels, seeds = _batch(cfg)
    return train_step(engine, [(tokens, labels, seeds)], lambda e, mb: e(mb[0], mb[1], sample_seeds=mb[2])[0],
                      NonFiniteGuard(5))


def test_one_rank_zero0_skips_the_reduction_with_identical_results(single_rank):
    from heptapod_ds.engine import build_engine
    from heptapod_ds.model import build_model

    cfg = _cfg(0)
    skipping, _, _ = build_engine(cfg, lambda: build_model(cfg))
    reducing, _, _ = build_engine(cfg, lambda: build_model(cfg))
    assert skipping.enable_backward_allreduce is False
    reducing.enable_backward_allreduce = True  # DeepSpeed's own path: flatten, all-reduce, copy back
    for _ in range(2):
        a, b = _step(skipping, cfg), _step(reducing, cfg)
        assert a.loss == b.loss and a.grad_norm == b.grad_norm
    for (name, p), q in zip(skipping.module.named_parameters(), reducing.module.parameters()):
        assert torch.equal(p, q), name
