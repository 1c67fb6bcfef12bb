"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (``backbone.attention=sdpa``).

:class:`SDPACoreAttention` is a drop-in for megatron-core's ``DotProductAttention``: the layer spec
puts it where the spec picks its core attention, so the layers, their parameters and their names
stay what they are (core attention owns no parameters). It takes megatron's tensors
``query/key/value [s, b, heads_per_partition, head_dim]`` and returns ``[sq, b, hidden_per_partition]``,
and follows megatron's masking rules exactly:

* an explicit ``attention_mask`` (bool, True = blocked; the local head's arbitrary mask) wins;
* else a causal layer with more than one query is causal (``is_causal``; with fewer queries than
  keys the mask is aligned to the last key, as in KV-cache decoding);
* else no mask (the global head; one query against a KV cache).

PyTorch picks the kernel: flash / memory-efficient attention on a GPU (bf16), the fused CPU flash
kernel on CPU, the math path otherwise. Dropout on the attention probabilities forks megatron's RNG
tracker exactly as ``DotProductAttention`` does, so TP ranks draw the same way.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from .slot_packing import PackedSlots

ATTENTIONS = ("auto", "sdpa", "megatron", "te")


class SDPACoreAttention(MegatronModule):
    """megatron core attention computed by one ``scaled_dot_product_attention`` call."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("backbone.attention=sdpa does not support context parallelism; use attention=te.")
        if config.num_query_groups != config.num_attention_heads:
            raise ValueError("backbone.attention=sdpa expects one key/value group per head (no GQA).")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"backbone.attention=sdpa supports the vanilla softmax only, "
                             f"not softmax_type={config.softmax_type}.")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        projection = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection, tp)
        head_dim = divide(projection, config.num_attention_heads)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if isinstance(packed_seq_params, PackedSlots) and attention_bias is None:
            return self._grouped(query, key, value, packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("backbone.attention=sdpa supports neither megatron's packed sequences nor attention bias.")
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))   # [b, heads, s, head_dim]
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = blocked; SDPA: True = attend
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                causal = True
            else:  # queries are the last sq of sk positions
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(diagonal=sk - sq)
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0:
            from megatron.core import tensor_parallel
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = _sdpa(q, k, v, mask, dropout, causal, self.softmax_scale)
        else:
            out = _sdpa(q, k, v, mask, 0.0, causal, self.softmax_scale)
        # [b, heads, sq, head_dim] -> [sq, b, heads * head_dim]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    @torch.compiler.disable(reason="the group sizes are host values that change every step; the layer's "
                                   "dense parts around it stay compiled (train.compile)")
    def _grouped(self, query, key, value, packed: PackedSlots) -> torch.Tensor:
        """The local head's packed slots ``[P, 1, heads, d]``: each length group is a contiguous ``[L, n]`` block
        (a view), attended with its window mask; the outputs are joined back into ``[P, 1, hidden]``."""
        dropout = self.dropout_p if self.training else 0.0
        fork = contextlib.nullcontext()
        if dropout > 0:
            from megatron.core import tensor_parallel
            fork = tensor_parallel.get_cuda_rng_tracker().fork()
        outs = []
        with fork:
            for (offset, length, size, _), mask in zip(packed.groups(), packed.allowed_masks()):
                q, k, v = (x[offset:offset + length * size].reshape(length, size, *x.shape[2:]).permute(1, 2, 0, 3)
                           for x in (query, key, value))                   # [n, heads, L, d]
                out = _sdpa(q, k, v, mask, dropout, False, self.softmax_scale)
                outs.append(out.permute(2, 0, 1, 3).reshape(length * size, self.hidden_size_per_partition))
        return torch.cat(outs)[:, None]


def _sdpa(q, k, v, mask, dropout, causal, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                            is_causal=causal, scale=scale)


def core_attention_class(attention: str, transformer_impl: str):
    """The module class the layer spec uses for core attention (``None``: keep the spec's own)."""
    if attention == "sdpa":
        return SDPACoreAttention
    if attention == "megatron":
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        return DotProductAttention
    if attention == "te":
        if transformer_impl != "transformer_engine":
            raise ValueError("backbone.attention=te needs the TransformerEngine layer spec "
                             "(backbone.transformer_impl=transformer_engine, or auto on a GPU with TE).")
        return None
    raise ValueError(f"unresolved attention '{attention}'; call resolve_impl() first.")
