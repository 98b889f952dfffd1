"""Optional contractivity control: bound a cell's recurrent weights (off unless you call it).

ParaRNN keeps its cells easy for Newton by clipping their diagonal recurrent weights. Here the
bound is a ``torch.nn.utils.parametrize`` parametrization, so it is smooth, trained through, and
saved with the module:

- a recurrent *vector* ``a`` (ParaGRU, ParaLSTM) becomes ``bound · tanh(a / bound)``: every
  entry stays in (-bound, bound);
- a recurrent *matrix* ``W_hh`` (Elman, GRU, LSTM; gate blocks stacked as in torch.nn) has each
  ``[H, H]`` gate block scaled down to spectral norm at most ``bound``.

Which parameters are recurrent, and of which kind, is declared by the cell's
``recurrent_parameters`` attribute: ``{"a": "diagonal"}`` or ``{"weight_hh": "matrix"}``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class SoftBound(nn.Module):
    """``a -> bound · tanh(a / bound)``: entries in (-bound, bound), the identity near 0."""

    def __init__(self, bound: float):
        super().__init__()
        self.bound = float(bound)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.bound * torch.tanh(a / self.bound)


class SpectralBound(nn.Module):
    """``W [G·H, H] -> W`` with each ``[H, H]`` block scaled to spectral norm at most ``bound``."""

    def __init__(self, bound: float):
        super().__init__()
        self.bound = float(bound)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        H = W.shape[-1]
        blocks = W.reshape(-1, H, H)  # [G, H, H]
        norms = torch.linalg.matrix_norm(blocks, ord=2)  # [G] largest singular values
        scale = torch.clamp(self.bound / norms.clamp_min(1e-30), max=1.0)
        return (blocks * scale[:, None, None]).reshape(W.shape)


def bound_recurrent_weights(cell: nn.Module, bound: float = 0.9) -> nn.Module:
    """Bound ``cell``'s recurrent weights in place (see the module docstring).

    Raises ValueError for a cell that declares no ``recurrent_parameters`` or a bound <= 0.

    Args:
        cell: a zoo cell that declares ``recurrent_parameters``.
        bound: the bound (> 0): ``bound·tanh(a/bound)`` on diagonal vectors, a spectral-norm bound
            on matrices.

    Returns:
        The same cell, its recurrent weights reparametrised (trained through).
    """
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound!r}")
    kinds = getattr(cell, "recurrent_parameters", {})
    if not kinds:
        raise ValueError(f"{type(cell).__name__} declares no recurrent_parameters to bound")
    for name, kind in kinds.items():
        if kind not in ("diagonal", "matrix"):
            raise ValueError(f"recurrent_parameters[{name!r}] must be 'diagonal' or 'matrix', got {kind!r}")
        parametrize.register_parametrization(cell, name, SoftBound(bound) if kind == "diagonal" else SpectralBound(bound))
    return cell


__all__ = ["SoftBound", "SpectralBound", "bound_recurrent_weights"]
