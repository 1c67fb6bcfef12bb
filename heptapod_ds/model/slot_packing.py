"""The local head's training sequences cut to the slots they read and packed into one tensor.

Why packed: the dense parts of a layer (norms, QKV, projection, MLP) act on every slot alone, so they run
once over all computed slots of a micro-batch; only attention needs the sequences apart. The layers see
one ``[P, 1, W]`` tensor (megatron layout with a batch of one); the core attention splits it into the
length groups of :func:`heptapod_ds.cost.slots.bucket_lengths` (views, no copy), runs each group as an
``[L, n]`` batch with its window mask, and joins the outputs. One call per layer keeps TP all-reduces,
ZeRO-3 gathers and recompute regions as they are; the pipeline sends the packed tensor between stages.

Layout: groups in ascending length; inside group g (length L, n sequences, sequences in ascending
``b * T + k`` order) token ``offset_g + s * n + i`` is slot s of the group's i-th sequence, i.e. each
group is a contiguous megatron ``[L, n, W]`` block. Built on the host from the drawn plan (the shapes are
host values), moved to the device with the draws.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch

from heptapod_ds.cost.slots import bucket_lengths, computed_length

_TENSORS = ("timesteps", "token_image", "token_slot", "token_visible", "select")


@dataclass
class PackedSlots:
    """Passed to the head's layers as megatron's ``packed_seq_params`` (its ``qkv_format`` is not ``thd``,
    so megatron hands it to the core attention untouched)."""
    lengths: Tuple[int, ...]     # slots of each group
    sizes: Tuple[int, ...]       # sequences in each group
    window: int
    timesteps: torch.Tensor      # long [R]: timestep of each packed sequence, group by group
    token_image: torch.Tensor    # long [P]: image of each packed token
    token_slot: torch.Tensor     # long [P]: its slot
    token_visible: torch.Tensor  # bool [P, 1]: slot <= t (a backbone output), else the mask token
    select: torch.Tensor         # long [S]: packed token of each supervised target, in plan order
    qkv_format: str = "heptapod_groups"
    _masks: Optional[List[torch.Tensor]] = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return sum(length * size for length, size in zip(self.lengths, self.sizes))

    def groups(self):
        """(token offset, length, sequences, sequence offset) of every group."""
        token, seq = 0, 0
        for length, size in zip(self.lengths, self.sizes):
            yield token, length, size, seq
            token += length * size
            seq += size

    def allowed_masks(self) -> List[torch.Tensor]:
        """Per group the bool mask ``[n, 1, L, L]`` (True = attend) of the window rule, made once per forward
        on the device of the timesteps (every layer reuses it)."""
        if self._masks is None:
            from .heads import local_attention_mask

            self._masks = [~local_attention_mask(self.timesteps[s:s + n], length, self.window)
                           for _, length, n, s in self.groups()]
        return self._masks

    def to(self, device, non_blocking: bool = False) -> "PackedSlots":
        moved = {name: getattr(self, name).to(device, non_blocking=non_blocking) for name in _TENSORS}
        return PackedSlots(self.lengths, self.sizes, self.window, **moved)

    def pin_memory(self) -> "PackedSlots":
        return PackedSlots(self.lengths, self.sizes, self.window,
                           **{name: getattr(self, name).pin_memory() for name in _TENSORS})


def pack_slots(timesteps: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, num_tokens: int, window: int,
               buckets: int) -> PackedSlots:
    """The packed layout of a drawn plan (host tensors: ``timesteps`` [B, T], targets' ``rows``, ``slots``)."""
    ts = timesteps.numpy()
    per_image = ts.shape[1]
    flat = ts.reshape(-1)
    if flat.size == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return PackedSlots((), (), window, empty, empty, empty, torch.zeros(0, 1, dtype=torch.bool), empty)
    edges = bucket_lengths(num_tokens, window, buckets)
    length_of = np.array([computed_length(int(t), num_tokens, window, edges) for t in range(num_tokens)])
    seq_len = length_of[flat]
    lengths, sizes, order = [], [], []
    for edge in edges:
        members = np.nonzero(seq_len == edge)[0]
        if members.size:
            lengths.append(int(edge))
            sizes.append(int(members.size))
            order.append(members)
    order = np.concatenate(order)
    group_of = np.empty(len(flat), dtype=np.int64)
    pos_of = np.empty(len(flat), dtype=np.int64)
    token_offset = np.empty(len(flat), dtype=np.int64)
    images, token_slots, visible = [], [], []
    token, start = 0, 0
    for g, (length, size) in enumerate(zip(lengths, sizes)):
        members = order[start:start + size]
        group_of[members], pos_of[members], token_offset[members] = g, np.arange(size), token
        s = np.arange(length)[:, None]                         # [L, 1]
        images.append(np.broadcast_to(members[None, :] // per_image, (length, size)).reshape(-1))
        token_slots.append(np.broadcast_to(s, (length, size)).reshape(-1))
        visible.append((s <= flat[members][None, :]).reshape(-1))
        token += length * size
        start += size
    size_of = np.array(sizes, dtype=np.int64)
    r, j = rows.numpy(), slots.numpy()
    select = token_offset[r] + j * size_of[group_of[r]] + pos_of[r] if r.size else np.zeros(0, dtype=np.int64)
    return PackedSlots(lengths=tuple(lengths), sizes=tuple(sizes), window=window,
                       timesteps=torch.from_numpy(flat[order].astype(np.int64)),
                       token_image=torch.from_numpy(np.concatenate(images).astype(np.int64)),
                       token_slot=torch.from_numpy(np.concatenate(token_slots).astype(np.int64)),
                       token_visible=torch.from_numpy(np.concatenate(visible))[:, None],
                       select=torch.from_numpy(np.asarray(select, dtype=np.int64)))
