"""Plain-PyTorch twin of every linear scan: a loop over T. Slow, obviously correct."""
from __future__ import annotations

import torch

from ..structure import Structure, as_structure


def scan_reference(
    A: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None,
    structure: Structure,
    reverse: bool = False,
    adjoint: bool = False,
) -> torch.Tensor:
    """Solve a linear recurrence with a Python loop over T.

    A: ``[B, T, *structure.storage_shape(d)]``, b: ``[B, T, d]``, h0: ``[B, d]`` or None. Returns ``[B, T, d]``.

    - ``reverse=False``: ``h_t = A_t h_{t-1} + b_t`` with ``h_{-1} = h0``.
    - ``reverse=True``:  ``h_t = A_t h_{t+1} + b_t`` with ``h_{T} = h0``.
    - ``adjoint=True``: the transition is the conjugate transpose of the *neighbour already
      visited*, i.e. ``h_t = A_{t+1}^H h_{t+1} + b_t`` (reverse) or ``h_t = A_{t-1}^H h_{t-1} + b_t``
      (forward), starting from ``h = b`` at the first visited step (h0 must be None). This is the
      adjoint (backward) recurrence of the opposite-direction scan.
    """
    B, T, d = b.shape
    structure = as_structure(structure, d)
    if adjoint and h0 is not None:
        raise ValueError("adjoint scans start from b; h0 must be None")
    As, bs = A.unbind(1), b.unbind(1)
    out: list[torch.Tensor | None] = [None] * T
    h = h0
    order = range(T - 1, -1, -1) if reverse else range(T)
    for s, t in enumerate(order):
        if adjoint:
            h = bs[t] if s == 0 else structure.matvec(structure.transpose(As[t + 1 if reverse else t - 1]), h) + bs[t]
        else:
            h = bs[t] if h is None else structure.matvec(As[t], h) + bs[t]
        out[t] = h
    # cat, not stack: inside the custom op (below autograd) stack returns a view of a [B, T·d] cat,
    # and an op's output that is a view cannot be modified in place (h += 1) by the caller
    return torch.cat([h_t.unsqueeze(1) for h_t in out], dim=1)
