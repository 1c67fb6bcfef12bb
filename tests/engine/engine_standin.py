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
