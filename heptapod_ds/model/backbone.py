"""The causal backbone: ``[cls(y), e(x_1), ..., e(x_{N-1})]`` -> ``[o_0, ..., o_{N-1}]``.

``o_t`` has seen the class and tokens ``x_1..x_t``. Layers are megatron-core TransformerLayers
(pre-norm, causal mask, tensor-parallel linears); embeddings, position tables and LayerNorms are
replicated across TP ranks. Generation runs the same module one slot at a time against megatron's
static KV cache (``StaticInferenceContext``).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from torch import nn

from .init import editable
from .layers import build_stack, make_transformer_config, run_precision
from .positions import LearnedPosition2D, rope2d_freqs


class CausalBackbone(nn.Module):
    def __init__(self, cfg, impl: str, tensor_parallel: int):
        super().__init__()
        bb, tok = cfg.backbone, cfg.tokenizer
        self.num_tokens = tok.num_tokens
        self.width = bb.width
        self.no_class = bb.num_classes  # index of the extra "no class" entry
        self.discrete = tok.is_discrete
        self.class_embed = nn.Embedding(bb.num_classes + 1, bb.width)
        if self.discrete:
            self.token_embed = nn.Embedding(tok.vocab_size, bb.width)
        else:
            self.token_embed = nn.Linear(tok.channels, bb.width)
        with editable(self.class_embed, self.token_embed):
            for emb in (self.class_embed, self.token_embed):
                nn.init.normal_(emb.weight, std=0.02)
        self.use_rope = bb.pos_embed == "rope2d"
        if self.use_rope:
            freqs = rope2d_freqs(tok.grid_size, bb.width // bb.num_heads, bb.rope_theta)
            self.register_buffer("rope_freqs", freqs, persistent=False)
        else:
            self.pos_embed = LearnedPosition2D(tok.grid_size, bb.width)
        self.config = make_transformer_config(depth=bb.depth, width=bb.width, num_heads=bb.num_heads,
                                              mlp_ratio=bb.mlp_ratio, dropout=bb.dropout,
                                              norm_eps=bb.norm_eps,
                                              tensor_parallel=tensor_parallel, precision=run_precision(cfg))
        self.decoder = build_stack(self.config, impl, AttnMaskType.causal)

    def forward(self, labels: torch.Tensor, tokens: Optional[torch.Tensor], start: int = 0,
                inference_context=None) -> torch.Tensor:
        """Run slots ``start .. n`` where ``n = tokens.shape[1]`` (0 when ``tokens`` is None).

        Slot 0 is the class embedding of ``labels`` (class index num_classes = "no class"); slot p >= 1
        embeds ``tokens[:, p-1]``. Training passes ``tokens[:, :N-1]`` with start=0. With a KV cache
        (``inference_context``), pass the tokens known so far and ``start`` = the cache length; the
        cache offset advances by the number of slots run. Returns ``[B, n - start + 1, width]``.
        """
        n = 0 if tokens is None else tokens.shape[1]
        if not 0 <= start <= n:
            raise ValueError(f"backbone slots start={start} outside [0, {n}]: pass the tokens up to the "
                             f"last slot.")
        if n > self.num_tokens - 1:
            raise ValueError(f"backbone takes at most {self.num_tokens - 1} tokens (x_1..x_(N-1)), got {n}.")
        if inference_context is not None and inference_context.sequence_len_offset != start:
            raise ValueError(f"the KV cache holds {inference_context.sequence_len_offset} slots but "
                             f"start={start}; "
                             f"run the slots in order with one cache per generation.")
        h, rotary = self.embed(labels, tokens, start, cached=inference_context is not None)
        out = self.decoder(hidden_states=h, attention_mask=None, rotary_pos_emb=rotary,
                           inference_context=inference_context)
        if inference_context is not None:
            inference_context.sequence_len_offset += h.shape[0]
        return out.transpose(0, 1)

    def embed(self, labels: torch.Tensor, tokens: Optional[torch.Tensor], start: int = 0,
              cached: bool = False):
        """Embeddings of slots ``start .. n`` in megatron layout ``[s, B, width]``, and the rotary angles
        the layers need (None with learned positions). ``cached``: the layers attend to a KV cache holding
        slots ``0 .. start-1`` (megatron then wants the angles of every slot up to the last)."""
        n = 0 if tokens is None else tokens.shape[1]
        parts = []
        if start == 0:
            parts.append(self.class_embed(labels)[:, None])
        first = max(start, 1)
        if first <= n:
            given = tokens[:, first - 1:n]
            if given.is_floating_point():  # fp32 latents into a bf16 model (DeepSpeed casts the weights only)
                given = given.to(self.token_embed.weight.dtype)
            parts.append(self.token_embed(given))
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        length = h.shape[1]
        rotary = None
        if self.use_rope:
            rotary = self.rotary(start, length, cached)
        else:
            h = h + self.pos_embed(start, length)
        return h.transpose(0, 1).contiguous(), rotary  # megatron layout [s, b, h]

    def rotary(self, start: int, length: int, cached: bool = False) -> Optional[torch.Tensor]:
        """Rotary angles of slots ``start .. start+length-1`` (from slot 0 with a KV cache)."""
        if not self.use_rope:
            return None
        return self.rope_freqs[:start + length] if cached else self.rope_freqs[start:start + length]
