"""Weight initialisation that survives DeepSpeed ZeRO-3's ``zero.Init``.

Under ``zero.Init`` every submodule's parameters are partitioned as soon as *its own* constructor
returns. An ``nn.init.*`` call in a parent constructor then writes into an empty partition and is
silently lost: the model trains from PyTorch's default init instead, and ZeRO-3 runs diverge from
ZeRO-0 runs. Post-construction init therefore goes through :func:`editable`, which gathers the
full parameters (rank 0's values are kept and broadcast) and is a no-op without ZeRO-3. Every rank
runs the same init code, so RNG streams stay aligned whatever the ZeRO stage.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Union

from torch import nn


def _params(items: Iterable[Union[nn.Module, nn.Parameter]]):
    out = []
    for item in items:
        out.extend(item.parameters() if isinstance(item, nn.Module) else [item])
    return out


@contextlib.contextmanager
def editable(*items: Union[nn.Module, nn.Parameter]) -> Iterator[None]:
    """Make the full values of the parameters of ``items`` writable inside the block."""
    params = _params(items)
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield
