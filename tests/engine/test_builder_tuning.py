"""The engine builder's speed settings keep the numbers: a one-rank data-parallel group skips DeepSpeed's
(no-op) gradient reduction."""
import torch

from engine_standin import StandIn, local_micro_batches, loss_fn
from heptapod_ds.config import load_config


def test_one_rank_zero0_skips_the_reduction_with_identical_results(single_rank):
    from heptapod_ds.engine import NonFiniteGuard, build_engine, train_step

    cfg = load_config(overrides=["parallel.zero_stage=0", "train.micro_batch_size=4",
                                 "train.global_batch_size=4", "train.grad_accum=1", "train.ema_decay=0",
                                 "logging.wandb_mode=disabled"], world_size=1)
    engines = []
    for _ in range(2):
        torch.manual_seed(0)
        engines.append(build_engine(cfg, StandIn)[0])
    skipping, reducing = engines
    assert skipping.enable_backward_allreduce is False
    reducing.enable_backward_allreduce = True  # DeepSpeed's own path: flatten, all-reduce, copy back
    for step in range(2):
        batches = local_micro_batches(step, 4, 0, 1, 1)
        a, b = (train_step(e, batches, loss_fn, NonFiniteGuard(5)) for e in engines)
        assert a.loss == b.loss and a.grad_norm == b.grad_norm
    for (name, p), q in zip(skipping.module.named_parameters(), reducing.module.parameters()):
        assert torch.equal(p, q), name
