"""Split T across programs: a scan as three passes of any scan kernel, for when B·d is small.

One Triton program walks all of T for one (batch row, lane tile): at B = 1, d = 64 that is a
handful of programs on a GPU with 100+ SMs. Splitting T into P pieces makes B·P independent rows:

1. every piece is scanned from a zero start (the kernel on ``[B·P, L, d]``), and its summary is
   its outgoing state and its composite transition ``Π A`` (a product for diagonal; for blocks,
   the piece scanned from each probe tangent with b = 0, as in sequence parallelism);
2. the P summaries are scanned (``[B, P, d]``, tiny) to give each piece's incoming state;
3. each piece adds the propagation of its incoming state: the kernel again with b = 0 and that
   state as h0.

The result equals one scan over T (tested against the loop at odd T, where the last piece is
padded with identity transitions). Work is about twice a plain scan, depth about T/P.
"""
from __future__ import annotations

import torch

from ..structure import Diagonal, Structure, shifted_adjoint_transitions


def composite_transition(scan, A: torch.Tensor, structure: Structure, d: int, reverse: bool = False) -> torch.Tensor:
    """The transition of a whole run of steps ``A [B, T, *jac]`` (the product of its A_t, in scan
    order), in storage form ``[B, *jac]``. Diagonal: the product. Otherwise: the run scanned by
    ``scan(A, b, h0, structure, reverse=...)`` from each of the structure's probe tangents with
    b = 0 gives one column of every block; the structure assembles them. Used for the pieces of a
    split scan and for the chunks of sequence parallelism."""
    if isinstance(structure, Diagonal):
        return A.prod(1)
    B = A.shape[0]
    zeros = A.new_zeros(B, A.shape[1], d)
    cols = []
    for e in structure.probe_tangents(B, d, A.dtype, A.device).unbind(0):
        h = scan(A, zeros, e.contiguous(), structure, reverse=reverse)
        cols.append(h[:, 0] if reverse else h[:, -1])  # [B, d]
    return structure.assemble(torch.stack(cols), d)


def _pieces(t: torch.Tensor, P: int, L: int, fill: torch.Tensor | float) -> torch.Tensor:
    """``[B, T, *]`` -> ``[B·P, L, *]``, the tail padded with ``fill`` (identity / zero)."""
    B, T = t.shape[:2]
    pad = P * L - T
    if pad:
        tail = (fill if isinstance(fill, torch.Tensor) else t.new_full((1,) * t.dim(), fill))
        t = torch.cat([t, tail.expand(B, pad, *t.shape[2:]).to(t.dtype)], 1)
    return t.reshape(B * P, L, *t.shape[2:])


def split_scan(scan, A: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, structure: Structure,
               pieces: int, reverse: bool = False, adjoint: bool = False) -> torch.Tensor:
    """``scan(A, b, h0, structure, reverse=..., adjoint=...)`` (any backend's signature) computed
    with T split into ``pieces`` rows of about T/pieces steps. Returns ``[B, T, d]``."""
    if adjoint:  # the plain scan of the shifted, conjugate-transposed transitions
        return split_scan(scan, shifted_adjoint_transitions(A, structure, not reverse), b, h0, structure,
                          pieces, reverse)
    if reverse:
        return split_scan(scan, A.flip(1), b.flip(1), h0, structure, pieces).flip(1)
    B, T, d = b.shape
    P = max(1, min(pieces, T))
    L = -(-T // P)
    P = -(-T // L)  # no empty piece
    if P == 1:
        return scan(A, b, h0, structure)
    eye = structure.identity(d, A.dtype, A.device)  # [*jac]
    Ap = _pieces(A, P, L, eye)  # [B·P, L, *jac]
    bp = _pieces(b, P, L, 0.0)  # [B·P, L, d]
    Ap, bp = Ap.contiguous(), bp.contiguous()
    local = scan(Ap, bp, None, structure)  # pass 1: from zero
    trans = composite_transition(scan, Ap, structure, d)  # [B·P, *jac]
    trans = trans.reshape(B, P, *trans.shape[1:])
    edges = local[:, -1].reshape(B, P, d)
    # pass 2: incoming state of every piece: h_in[p] = T_{p-1} h_in[p-1] + edge[p-1], h_in[0] = h0
    shifted_T = torch.cat([torch.zeros_like(trans[:, :1]), trans[:, :-1]], 1)
    shifted_e = torch.cat([(h0 if h0 is not None else torch.zeros_like(edges[:, 0])).unsqueeze(1),
                           edges[:, :-1]], 1)
    h_in = scan(shifted_T.contiguous(), shifted_e.contiguous(), None, structure)  # [B, P, d]
    # pass 3: add each piece's propagated incoming state
    fix = scan(Ap, torch.zeros_like(bp), h_in.reshape(B * P, d).contiguous(), structure)
    out = local.add_(fix).reshape(B, P * L, d)
    # a padded tail is cut off: the slice is strided for B > 1, and callers (the custom op's fake
    # implementation among them) promise a contiguous [B, T, d]
    return out if P * L == T else out[:, :T].contiguous()


__all__ = ["composite_transition", "split_scan"]
