"""Helpers shared by the cells: head masks for block-diagonal (multi-head) recurrent weights."""
from __future__ import annotations

import torch

from ..structure import Block


def check_heads(size: int, heads: int) -> None:
    if not isinstance(heads, int) or heads < 1 or size % heads:
        raise ValueError(f"heads must divide the hidden size: hidden={size}, heads={heads}")


def head_mask(size: int, heads: int, rows_per_col: int = 1) -> torch.Tensor:
    """Block-diagonal 0/1 mask ``[rows_per_col*size, size]`` for ``heads`` heads (gate-stacked rows)."""
    check_heads(size, heads)
    hd = size // heads
    m = torch.block_diag(*[torch.ones(hd, hd)] * heads)  # [size, size]
    return m.repeat(rows_per_col, 1)


def head_structure(size: int, heads: int, parts: int = 1):
    """Jacobian structure of a multi-head cell: dense with one head, else blocks of parts*head_dim."""
    check_heads(size, heads)
    return "dense" if heads == 1 else Block(parts * size // heads)


def recurrent_weight(cell) -> torch.Tensor:
    """``cell.weight_hh`` with the head mask applied (the plain weight for one head: nothing to mask)."""
    return cell.weight_hh if cell.heads == 1 else cell.weight_hh * cell.mask
