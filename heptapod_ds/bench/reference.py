"""The plain-PyTorch reference of a Heptapod model: every megatron TransformerBlock replaced by torch.nn.

The backbone's and head's megatron blocks become :class:`PlainBlock` (``nn.LayerNorm``, ``nn.Linear``,
``scaled_dot_product_attention``, GELU MLP), with the *same parameter names*, so the full stack's
state dict loads strictly and the first loss must match (checked by the bench to 1e-5). Embeddings,
2D positions, the supervision plan and the outputs are plain torch modules already and are kept.
Trained with ``torch.optim.AdamW`` (torch's defaults) and ``clip_grad_norm_``: no DeepSpeed, no megatron.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


def _rotate(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary embedding (pairs channel i with i + d/2), as megatron applies it."""
    x1, x2 = t.chunk(2, dim=-1)
    return t * freqs.cos() + torch.cat([-x2, x1], dim=-1) * freqs.sin()


class PlainAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.linear_qkv = nn.Linear(width, 3 * width)
        self.linear_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], rotary: Optional[torch.Tensor],
                packed=None) -> torch.Tensor:
        s, b, w = x.shape
        qkv = self.linear_qkv(x).view(s, b, self.heads, 3, w // self.heads)   # megatron: per head [q, k, v]
        q, k, v = qkv.unbind(dim=3)                                          # [s, b, h, d]
        if rotary is not None:
            q, k = _rotate(q, rotary), _rotate(k, rotary)
        if packed is not None:  # the local head's packed length groups, each an [L, n] block
            outs = []
            for (offset, length, size, _), allowed in zip(packed.groups(), packed.allowed_masks()):
                qg, kg, vg = (t[offset:offset + length * size].reshape(length, size, *t.shape[2:]).permute(1, 2, 0, 3)
                              for t in (q, k, v))
                out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=allowed)
                outs.append(out.permute(2, 0, 1, 3).reshape(length * size, w))
            return self.linear_proj(torch.cat(outs)[:, None])
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else ~mask,
                                             is_causal=self.causal and mask is None)
        return self.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, w))


class PlainMLP(nn.Module):
    def __init__(self, width: int, ffn: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(width, ffn)
        self.linear_fc2 = nn.Linear(ffn, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class PlainLayer(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, eps: float, causal: bool):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(width, eps=eps)
        self.self_attention = PlainAttention(width, heads, causal)
        self.pre_mlp_layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = PlainMLP(width, ffn)

    def forward(self, x, mask, rotary, packed=None):
        x = x + self.self_attention(self.input_layernorm(x), mask, rotary, packed)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class PlainBlock(nn.Module):
    """Pre-norm layers + final LayerNorm with megatron TransformerBlock's call signature and names."""

    def __init__(self, config, causal: bool):
        super().__init__()
        w, h, ffn, eps = config.hidden_size, config.num_attention_heads, config.ffn_hidden_size, config.layernorm_epsilon
        self.layers = nn.ModuleList(PlainLayer(w, h, ffn, eps, causal) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(w, eps=eps)

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, inference_context=None,
                packed_seq_params=None):
        if inference_context is not None:
            raise ValueError("the plain reference is for training; it has no KV cache.")
        x = hidden_states
        for layer in self.layers:
            x = layer(x, attention_mask, rotary_pos_emb, packed_seq_params)
        return self.final_layernorm(x)


def plain_reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (an unwrapped, full HeptapodModel at TP=1) whose transformer blocks are plain torch."""
    from megatron.core.transformer.enums import AttnMaskType

    owners = [m for m in (model.backbone, model.head) if m is not None]
    blocks = [o.decoder for o in owners]
    try:  # megatron blocks hold process groups, which cannot be copied: copy the model without them
        for o in owners:
            o.decoder = nn.Identity()
        ref = copy.deepcopy(model)
    finally:
        for o, block in zip(owners, blocks):
            o.decoder = block
    for owner, old in zip([m for m in (ref.backbone, ref.head) if m is not None], blocks):
        causal = old.layers[0].self_attention.attn_mask_type == AttnMaskType.causal
        plain = PlainBlock(owner.config, causal=causal).to(next(old.parameters()).device)
        missing, unexpected = plain.load_state_dict(old.state_dict(), strict=False)
        if missing or [k for k in unexpected if not k.endswith("_extra_state")]:
            raise RuntimeError(f"plain reference does not match the megatron block: missing {missing}, "
                               f"unexpected {unexpected}.")
        owner.decoder = plain
    leftovers = [type(m).__name__ for m in ref.modules() if type(m).__module__.startswith("megatron")]
    if leftovers:
        raise RuntimeError(f"plain reference still holds megatron modules: {sorted(set(leftovers))}.")
    return ref
