"""The next-2D-distribution heads (``head.type`` global / local); ``next`` needs no module.

Both heads are MAE-decoder style: for a timestep t of image b they take N + 1 slots
``[o_0, ..., o_t, m, ..., m]`` (backbone outputs of the visible prefix projected to the head width,
a learned mask token ``m`` at every remaining position), add 2D position information (a learned
table added to the input, or 2D rotary angles in attention: ``head.pos_embed``), and run a stack of
megatron TransformerLayers. The output at slot j > t is the condition ``z_{t,j}`` of token
``x_j``. Only prefix slots carry image content, so ``z_{t,j}`` depends on ``x_1..x_t`` alone.

* global: every slot attends to every slot (bidirectional, no mask).
* local: a slot in the window ``(t, t+W]`` attends to the window (bidirectionally) and to the
  prefix ``[0, t]`` - the prefix enters as keys/values, i.e. cross-attention in joint form; prefix
  slots attend to the prefix only; slots after the window attend to themselves and are never read.
  So they are not computed: in training the sequences are cut to ``min(t + 1 + W, N + 1)`` slots and
  packed in length groups (:mod:`.slot_packing`), in sampling each step is cut to its length; its core
  attention is always SDPA (which splits the packed groups).

TP: the layers are TP-sharded as in the backbone; projection, mask token and positions are replicated.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from torch import nn

from heptapod_ds.cost.slots import needed_length

from .layers import LayerImpl, as_impl, build_stack, make_transformer_config, run_precision
from .positions import LearnedPosition2D, rope2d_freqs
from .slot_packing import PackedSlots


def local_attention_mask(timesteps: torch.Tensor, num_slots: int, window: int) -> torch.Tensor:
    """Boolean mask (True = blocked) of shape [len(timesteps), 1, S, S] for the local head."""
    s = torch.arange(num_slots, device=timesteps.device)
    t = timesteps.reshape(-1, 1, 1)
    q, k = s[None, :, None], s[None, None, :]
    q_prefix, k_prefix = q <= t, k <= t
    q_window = (q > t) & (q <= t + window)
    k_window = (k > t) & (k <= t + window)
    allowed = (q_prefix & k_prefix) | (q_window & (k_prefix | k_window)) | (q == k)
    return (~allowed)[:, None]


class GridHead(nn.Module):
    """Global head (``window=None``) or local head (``window=W``) over the N + 1 slots."""

    def __init__(self, cfg, impl: str, tensor_parallel: int, window: Optional[int] = None):
        super().__init__()
        head, tok = cfg.head, cfg.tokenizer
        self.num_slots = tok.num_tokens + 1
        self.window = window
        self.input_proj = nn.Linear(cfg.backbone.width, head.width)
        self.mask_token = nn.Parameter(torch.empty(head.width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.use_rope = head.pos_embed == "rope2d"
        if self.use_rope:
            freqs = rope2d_freqs(tok.grid_size, head.width // head.num_heads, cfg.backbone.rope_theta)
            self.register_buffer("rope_freqs", freqs, persistent=False)
        else:
            self.pos_embed = LearnedPosition2D(tok.grid_size, head.width)
        self.config = make_transformer_config(depth=head.depth, width=head.width, num_heads=head.num_heads,
                                              mlp_ratio=head.mlp_ratio, dropout=cfg.backbone.dropout,
                                              norm_eps=cfg.backbone.norm_eps, tensor_parallel=tensor_parallel,
                                              precision=run_precision(cfg))
        mask_type = AttnMaskType.no_mask if window is None else AttnMaskType.arbitrary
        if window is not None:  # the packed groups are split inside the core attention: SDPA's
            impl = LayerImpl(as_impl(impl).transformer, "sdpa")
        self.decoder = build_stack(self.config, impl, mask_type)

    def forward(self, prefix: torch.Tensor, timesteps: torch.Tensor, packed: Optional[PackedSlots] = None,
                bounded: bool = False, num_slots: Optional[int] = None) -> torch.Tensor:
        """The head's last features in megatron layout.

        ``prefix``: backbone outputs [B, n, Wb] (n > max t); ``timesteps``: long [B, T]. Returns
        ``[S, B * T, W_head]`` (sequence b * T + k is image b at its k-th timestep; slot j > t holds
        ``z_{t,j}``; S = ``num_slots``, default all N + 1: the sampling step cuts it to
        :meth:`sampling_length`), or with ``packed`` (the local head's cut training sequences,
        :mod:`.slot_packing`) ``[P, 1, W_head]``. ``bounded``: the caller guarantees max t < n (a drawn
        plan), so the values are not read to check it. Always call the module (not a method): ZeRO-3 gathers
        the mask token in its hooks.
        """
        b, n, _ = prefix.shape
        if timesteps.dim() != 2 or timesteps.shape[0] != b:
            raise ValueError(f"timesteps must be [B={b}, T], got {tuple(timesteps.shape)}.")
        if not bounded and timesteps.device.type == "cpu" and timesteps.numel() and int(timesteps.max()) >= n:
            # host timesteps only: a device value is never read here (callers with a plan pass bounded)
            raise ValueError(f"timestep {int(timesteps.max())} needs backbone outputs o_0..o_t, "
                             f"only {n} given.")
        x = self.embed(prefix, timesteps, packed, num_slots)
        return self.decoder(hidden_states=x, **self.layer_kwargs(timesteps, packed, num_slots))

    @staticmethod
    def by_slot(features: torch.Tensor, batch: int) -> torch.Tensor:
        """Unpacked features ``[S, B * T, W]`` as ``[B, T, S, W]`` (slot j of image b's k-th timestep)."""
        s, bt, w = features.shape
        return features.transpose(0, 1).reshape(batch, bt // batch, s, w)

    def sampling_length(self, t: int) -> int:
        """Slots of the head's sequence at sampling step t (pass it to ``forward`` as ``num_slots``)."""
        return needed_length(t, self.num_slots - 1, self.window)

    def embed(self, prefix: torch.Tensor, timesteps: torch.Tensor, packed: Optional[PackedSlots] = None,
              num_slots: Optional[int] = None) -> torch.Tensor:
        """The head's input: ``[o_0..o_t, m, ..., m]`` (+ learned 2D positions) per (image, timestep), in
        megatron layout ``[S, B * T, W_head]`` (sequence b * T + k is image b at its k-th timestep; S =
        ``num_slots``, default N + 1), or packed ``[P, 1, W_head]`` with ``packed``."""
        if packed is not None:
            return self._embed_packed(prefix, packed)
        b, n, _ = prefix.shape
        num_t = timesteps.shape[1]
        num_slots = num_slots or self.num_slots
        proj = self.input_proj(prefix)                                     # [B, n, Wh]
        proj = nn.functional.pad(proj, (0, 0, 0, num_slots - n))           # [B, S, Wh]
        slots = torch.arange(num_slots, device=prefix.device)
        visible = slots[None, None, :, None] <= timesteps[:, :, None, None]  # [B, T, S, 1]
        x = torch.where(visible, proj[:, None], self.mask_token)            # [B, T, S, Wh]
        if not self.use_rope:
            x = x + self.pos_embed(0, num_slots)
        return x.reshape(b * num_t, num_slots, -1).transpose(0, 1).contiguous()

    def _embed_packed(self, prefix: torch.Tensor, packed: PackedSlots) -> torch.Tensor:
        b, n, _ = prefix.shape
        proj = self.input_proj(prefix).reshape(b * n, -1)                  # [B * n, Wh]
        source = packed.token_image * n + packed.token_slot.clamp(max=n - 1)
        x = torch.where(packed.token_visible, proj[source], self.mask_token)  # [P, Wh]
        if not self.use_rope:
            x = x + self.pos_embed(0, self.num_slots)[packed.token_slot]
        return x[:, None]

    def rotary(self, num_slots: Optional[int] = None) -> Optional[torch.Tensor]:
        """Rotary angles of the first ``num_slots`` slots (default all N + 1) for every head layer (None with
        learned positions)."""
        if not self.use_rope:
            return None
        return self.rope_freqs if num_slots is None else self.rope_freqs[:num_slots]

    def attention_mask(self, timesteps: torch.Tensor, num_slots: Optional[int] = None) -> Optional[torch.Tensor]:
        """None for the global head; the local head's window mask per (image, timestep)."""
        if self.window is None:
            return None
        return local_attention_mask(timesteps.reshape(-1), num_slots or self.num_slots, self.window)

    def layer_kwargs(self, timesteps: torch.Tensor, packed: Optional[PackedSlots] = None,
                     num_slots: Optional[int] = None) -> dict:
        """What every head layer is called with besides ``hidden_states`` (the pipeline stages call the
        layers one by one with these)."""
        if packed is not None:
            rotary = None if not self.use_rope else self.rope_freqs[packed.token_slot]   # [P, 1, 1, d]
            return {"attention_mask": None, "rotary_pos_emb": rotary, "packed_seq_params": packed}
        return {"attention_mask": self.attention_mask(timesteps, num_slots), "rotary_pos_emb": self.rotary(num_slots)}
