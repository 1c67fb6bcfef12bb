"""How DeepSpeed 0.19 lays a TP rank's parameters out in its ZeRO files: one place for the arithmetic
that the reader (to consolidate) and the writer (to partition) share.

* ZeRO-1/2: each optimizer param group is flattened in group order and padded to a multiple of
  ``2 x dp`` (``nccl_start_alignment_factor``); DP rank d owns the contiguous slice
  ``[d*ps, (d+1)*ps)`` with ``ps = padded / dp``. The saved fp32 partition is *lean* (padding cut),
  the AdamW moments keep it; ``group_paddings`` says how much of a rank's slice is padding.
* ZeRO-3: every parameter is padded to a multiple of dp and rank d owns elements
  ``[d*k, (d+1)*k)`` with ``k = ceil(numel / dp)``; a rank's flat fp32 group is the concatenation of
  its pieces of the group's parameters, split into sub-groups of about ``sub_group_size`` elements.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

ALIGN = 2  # DeepSpeed's nccl_start_alignment_factor


def zero12_partition_size(group_numel: int, dp: int) -> int:
    align = ALIGN * dp
    padded = -(-group_numel // align) * align
    return padded // dp


def zero12_slice(group_numel: int, dp: int, rank: int) -> Tuple[int, int, int]:
    """(start, lean length, padding) of DP rank ``rank``'s slice of a flat group of ``group_numel``."""
    ps = zero12_partition_size(group_numel, dp)
    start = rank * ps
    lean = max(0, min(ps, group_numel - start))
    return start, lean, ps - lean


def zero3_piece(numel: int, dp: int) -> int:
    """Elements of one parameter that each DP rank holds under ZeRO-3 (the last one padded)."""
    return -(-numel // dp)


def zero3_sub_groups(numels: Sequence[int], dp: int, sub_group_size: int) -> List[List[int]]:
    """Indices of the group's parameters per ZeRO-3 sub-group (DeepSpeed's _create_fp16_sub_groups)."""
    pieces = [zero3_piece(n, dp) for n in numels]
    if not pieces:
        return []
    if sub_group_size is None or sub_group_size >= sum(pieces):
        return [list(range(len(pieces)))]
    out, cur, size = [], [], 0
    for i, p in enumerate(pieces):
        cur.append(i)
        size += p
        if size >= sub_group_size or i == len(pieces) - 1:
            out.append(cur)
            cur, size = [], 0
    return out


def stage_dir(tag_dir, pp: int, pp_rank: int):
    """Folder of one pipeline stage's DeepSpeed files (``engine/checkpoint.py::_engine_tag``)."""
    return tag_dir if pp == 1 else tag_dir / f"pp_stage{pp_rank:02d}"


def model_file(zero: int, tp_rank: int, dp_rank: int) -> str:
    if zero == 3:
        return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt"
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def optim_file(tp_rank: int, dp_rank: int, bf16: bool = False) -> str:
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


def global_rank(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """megatron-core's rank order tp-cp-ep-dp-pp (see distributed/parallel_state.py)."""
    return tp_rank + tp * (dp_rank + dp * pp_rank)
