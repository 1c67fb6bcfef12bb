"""Host reads of tensor values per optimizer step, counted through the real training step on CPU.

On CPU every tensor counts as a device tensor (:func:`heptapod_ds.distributed.strict_device.count_host_reads`),
so the count is what a GPU would wait for. The project's own code may read once per step (loss and the
non-finite flag together); DeepSpeed's and megatron's reads are listed, not counted.
"""
from collections import Counter

import pytest
import torch

from heptapod_ds.distributed.strict_device import count_host_reads
from heptapod_ds.engine import NonFiniteGuard, build_engine, train_step
from heptapod_ds.model import build_model
from heptapod_ds.model.draws import draw_batch
from heptapod_ds.training.loop import MicroBatch


def _cfg(kind, head, zero):
    from heptapod_ds.config.loader import load_config

    tok = ["tokenizer.name=pixel"] if kind == "discrete" else ["tokenizer.name=patch", "tokenizer.channels=16"]
    return load_config(overrides=tok + [
        f"head.type={head}", "head.window=6", "head.timesteps=3", "head.supervised=5", "backbone.depth=2",
        "backbone.width=32", "backbone.num_heads=4", "head.depth=2", "head.width=32", "head.num_heads=4",
        "diffusion.depth=2", "diffusion.width=32", "diffusion.batch_mul=2", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.grad_accum=0", f"parallel.zero_stage={zero}"], world_size=1)


def _micro_batches(cfg, steps_done, count, poison=False):
    out = []
    for k in range(count):
        g = torch.Generator().manual_seed(100 * steps_done + k)
        n = cfg.tokenizer.num_tokens
        if cfg.tokenizer.is_discrete:
            tokens = torch.randint(0, cfg.tokenizer.vocab_size, (4, n), generator=g)
        else:
            tokens = torch.randn(4, n, cfg.tokenizer.channels, generator=g)
            if poison and k == count - 1:
                tokens[0, 0, 0] = float("nan")
        labels = torch.randint(0, 10, (4,), generator=g)
        seeds = torch.arange(4) + 10 * (100 * steps_done + k)
        out.append(MicroBatch(tokens, labels, seeds, draw_batch(cfg, 4, seeds, training=True)))
    return out


def _loss(engine, mb):
    mb = mb.to("cpu")
    return engine(mb.tokens, mb.labels, draws=mb.draws)[0]


@pytest.mark.parametrize("kind,zero", [("discrete", 0), ("continuous", 1), ("continuous", 2)])
def test_one_project_host_read_per_optimizer_step(single_rank, kind, zero):
    torch.manual_seed(0)
    cfg = _cfg(kind, "local", zero)
    assert cfg.train.grad_accum == 2
    engine, _, _ = build_engine(cfg, lambda: build_model(cfg))
    nonfinite = NonFiniteGuard(5)
    steps = 3
    counts, sites = Counter(), {}
    batches = [_micro_batches(cfg, step, 2) for step in range(steps)]  # the loader side, on the host
    with count_host_reads(counts, sites):
        for step in range(steps):
            result = train_step(engine, batches[step], _loss, nonfinite)
            assert not result.skipped and result.loss == result.loss
    assert counts["project"] <= steps, "\n".join(sites["project"])
    others = {k: v for k, v in counts.items() if k != "project"}
    print(f"host reads in {steps} steps: project {counts['project']}, elsewhere {others}")
    for origin, where in sites.items():
        if origin != "project":
            print(origin, sorted(set(where))[:5])
    # the gradient norm is read when someone asks for it, not by the step
    before = counts["project"]
    with count_host_reads(counts, sites):
        norm = result.grad_norm
    assert norm is not None and counts["project"] == before + 1


def test_a_poisoned_micro_batch_skips_the_step_with_one_read(single_rank):
    torch.manual_seed(0)
    cfg = _cfg("continuous", "global", 1)
    engine, _, _ = build_engine(cfg, lambda: build_model(cfg))
    before = [p.detach().clone() for p in engine.module.parameters()]
    nonfinite = NonFiniteGuard(5)
    counts, sites = Counter(), {}
    batches = _micro_batches(cfg, 0, 2, poison=True)
    with count_host_reads(counts, sites):
        result = train_step(engine, batches, _loss, nonfinite)
    assert result.skipped and nonfinite.total_skipped == 1
    assert counts["project"] <= 1, "\n".join(sites["project"])
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    result = train_step(engine, _micro_batches(cfg, 1, 2), _loss, nonfinite)  # the next step trains
    assert not result.skipped and nonfinite.in_a_row == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))


def test_gpu_rng_state_is_restored_on_the_device_that_exists(monkeypatch):
    """A checkpoint of a task that saw 8 GPUs (a list of 8 states) resumes on a task that sees one."""
    from heptapod_ds.engine import checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([40 + device], dtype=torch.uint8))
    states = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    checkpoint._restore_device_rng(states)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    checkpoint._restore_device_rng(states)
    checkpoint._restore_device_rng(checkpoint._this_device_rng_state())  # what a new checkpoint holds
    assert restored == [(0, 0), (5, 5), (45, 5)]
