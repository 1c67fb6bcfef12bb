"""2D positions of the Heptapod sequence: slot 0 is the class slot, slot s >= 1 is grid token s-1.

Both the backbone (slots 0..N-1: class, x_1..x_{N-1}) and the head (slots 0..N) index positions
the same way. The class slot sits at (row, col) = (0, 0) and grid token (r, c) at (r + 1, c + 1), so
the class has a position of its own that no grid cell shares.
"""
from __future__ import annotations

import torch
from torch import nn


def slot_rows_cols(grid_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of the N + 1 slots, class first, as long tensors of length N + 1."""
    idx = torch.arange(grid_size * grid_size)
    rows = torch.cat([torch.zeros(1, dtype=torch.long), idx // grid_size + 1])
    cols = torch.cat([torch.zeros(1, dtype=torch.long), idx % grid_size + 1])
    return rows, cols


def rope2d_freqs(grid_size: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotary angles of the N + 1 slots as megatron expects them: shape [N + 1, 1, 1, head_dim].

    Megatron rotates with the non-interleaved ``rotate_half`` convention, which pairs channel i with
    channel i + head_dim/2. The first quarter of each half rotates with the row, the second quarter
    with the column, so each rotated pair sees exactly one axis.
    """
    if head_dim % 4:
        raise ValueError(f"2D rotary embedding needs a head dimension divisible by 4, got {head_dim}; "
                         f"change width / num_heads or use backbone.pos_embed=learned.")
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = slot_rows_cols(grid_size)
    half = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)  # [S, head_dim/2]
    return torch.cat([half, half], dim=-1).float()[:, None, None, :]


class LearnedPosition2D(nn.Module):
    """Additive 2D position embedding: a row table plus a column table (row 0 / col 0 = class slot)."""

    def __init__(self, grid_size: int, width: int, init_std: float = 0.02):
        super().__init__()
        self.row_embed = nn.Parameter(torch.empty(grid_size + 1, width))
        self.col_embed = nn.Parameter(torch.empty(grid_size + 1, width))
        nn.init.normal_(self.row_embed, std=init_std)
        nn.init.normal_(self.col_embed, std=init_std)
        rows, cols = slot_rows_cols(grid_size)
        self.register_buffer("slot_rows", rows, persistent=False)
        self.register_buffer("slot_cols", cols, persistent=False)

    def forward(self, start: int, length: int) -> torch.Tensor:
        """Embeddings of slots start .. start+length-1, shape [length, width]."""
        rows = self.slot_rows[start:start + length]
        cols = self.slot_cols[start:start + length]
        return self.row_embed[rows] + self.col_embed[cols]
