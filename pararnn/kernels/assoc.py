"""A log-depth scan in plain tensor ops (batched matmuls): the GPU path where no Triton kernel exists.

``h_t = A_t h_{t-1} + b_t`` is the scan of the associative operator on pairs
``(A_j, b_j) ∘ (A_i, b_i) = (A_j A_i, A_j b_i + b_j)`` (i before j). Hillis–Steele doubling: at
offset s = 1, 2, 4, ... every position t ≥ s combines with position t − s, so after ⌈log2 T⌉
rounds position t holds the composition of steps 0..t and ``b_t`` is ``h_t``. Each round is one
batched matmul (or product, for diagonal) over all T: O(T log T) work, log T depth, no Python loop
over T. It serves dense, shared-block, ``Block(k > 4)`` and fp64 on CUDA, where the Triton kernels
stop, and any device else. Semantics (reverse, adjoint, h0): :func:`pararnn.kernels.reference.scan_reference`,
its twin in the tests.
"""
from __future__ import annotations

import torch

from ..structure import Block, Diagonal, Structure, shifted_adjoint_transitions


def _compose(structure: Structure, A_later: torch.Tensor, A_earlier: torch.Tensor) -> torch.Tensor:
    """The transition of "A_earlier then A_later", in storage form."""
    if isinstance(structure, Diagonal):
        return A_later * A_earlier
    return A_later @ A_earlier  # [.., k, k] blocks, shared [.., k, k] or dense [.., d, d]


def scan_assoc(A: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, structure: Structure,
               reverse: bool = False, adjoint: bool = False) -> torch.Tensor:
    """``[B, T, d]``: the same answer as ``scan_reference`` (same arguments), by doubling."""
    if adjoint:  # the plain scan of the shifted, conjugate-transposed transitions (h0 is None)
        if h0 is not None:
            raise ValueError("adjoint scans start from b; h0 must be None")
        return scan_assoc(shifted_adjoint_transitions(A, structure, not reverse), b, None, structure, reverse)
    if reverse:
        return scan_assoc(A.flip(1), b.flip(1), h0, structure).flip(1)
    T = b.shape[1]
    b = b.clone()  # [B, T, d]
    if h0 is not None:  # h0 enters through the first step: b_0 += A_0 h0
        b[:, 0] += structure.matvec(A[:, 0], h0)
    if T == 1:
        return b
    if isinstance(structure, Block) and not structure.shared:
        A = A.contiguous()
    s = 1
    while s < T:
        b_new = b.clone()
        b_new[:, s:] += structure.matvec(A[:, s:], b[:, :-s])
        if 2 * s < T:  # the transitions are needed for the next round only
            A_new = A.clone()
            A_new[:, s:] = _compose(structure, A[:, s:], A[:, :-s])
            A = A_new
        b = b_new
        s *= 2
    return b


__all__ = ["scan_assoc"]
