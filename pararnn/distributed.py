"""Sequence parallelism on torch.distributed: each rank holds one time chunk of every sequence.

A linear scan over chunks spread across ranks needs only each chunk's summary: its composite
transition ``P_r = A_last ··· A_first`` and its outgoing state from a zero start. After one
all_gather of those summaries, every rank folds the chunks before it into its incoming state and
fixes its local states with one more local scan. Communication per scan:
``world_size · B · (d + |P|)`` numbers (``|P| = d`` for diagonal), independent of T.

The Newton solver uses these scans (forward and adjoint) and one more all_gather per iteration
for the boundary state each rank's first step reads. Chunks may have different lengths (T need
not divide by the world size) but every rank needs at least one step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .scan import scan_dispatch
from .structure import matvec, transpose


def rank_and_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape everywhere), in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def transfer(A: torch.Tensor, structure, d: int, reverse: bool, backend: str = "auto") -> torch.Tensor:
    """The composite transition of a whole chunk, in storage form ``[B, *jac]``.

    Diagonal: the product of the A_t. Blocks/dense: column j of every block is the final state of
    the scan started from the j-th unit vector of each block with b = 0 (k scans).
    """
    if structure == "diagonal":
        return A.prod(1)
    k = d if structure == "dense" else structure.k
    B, T = A.shape[:2]
    zeros = A.new_zeros(B, T, d)
    cols = []
    for j in range(k):
        e = A.new_zeros(B, d)
        e[:, j::k] = 1
        h = scan_dispatch(A, zeros, e, structure, reverse=reverse, backend=backend)
        cols.append(h[:, 0] if reverse else h[:, -1])  # [B, d]: column j of every block
    M = torch.stack(cols, -1)  # [B, d, k]
    if structure == "dense":
        return M
    M = M.reshape(B, d // k, k, k)
    return M[:, 0] if structure.shared else M


def sp_scan(A, b, h0, structure, reverse=False, group=None, backend="auto"):
    """Sequence-parallel ``h_t = A_t h_{t∓1} + b_t`` on this rank's chunk.

    ``A, b``: this rank's time chunk; ``h0``: the global initial state, used by the first rank
    in scan order (rank 0, or the last rank for ``reverse``). Returns ``(h [B, T_local, d],
    h_in [B, d])``, h_in being the state entering this chunk.
    """
    rank, W = rank_and_size(group)
    d = b.shape[-1]
    first = W - 1 if reverse else 0
    local = scan_dispatch(A, b, h0 if rank == first else None, structure, reverse=reverse, backend=backend)
    P = transfer(A, structure, d, reverse, backend)
    edge = local[:, 0] if reverse else local[:, -1]  # the chunk's outgoing state from a zero start
    Ps, edges = all_gather(P, group), all_gather(edge, group)
    h_in = torch.zeros_like(edge)
    if rank == first and h0 is not None:
        h_in = h0
    order = range(W - 1, rank, -1) if reverse else range(rank)
    for q in order:  # fold the chunks before this one (in scan order)
        h_in = matvec(Ps[q], h_in, structure) + edges[q]
    if rank != first:
        local = local + scan_dispatch(A, torch.zeros_like(b), h_in, structure, reverse=reverse, backend=backend)
    return local, h_in


def shifted_adjoint_transitions(A, structure, reverse, group):
    """``A'_t = A_{t±1}^H`` across rank boundaries, for the adjoint of a (reverse) scan.

    The adjoint of a forward scan is the reverse scan ``λ_t = A_{t+1}^H λ_{t+1} + g_t``: its last
    local step needs the next rank's first transition (and zero on the last rank).
    """
    rank, W = rank_and_size(group)
    if not reverse:  # need A_{t+1}: the next rank's first transition
        firsts = all_gather(A[:, 0], group)
        nxt = firsts[rank + 1] if rank + 1 < W else torch.zeros_like(A[:, 0])
        shifted = torch.cat([A[:, 1:], nxt.unsqueeze(1)], 1)
    else:  # adjoint of a reverse scan, λ_t = A_{t-1}^H λ_{t-1} + g_t: the previous rank's last
        lasts = all_gather(A[:, -1], group)
        prv = lasts[rank - 1] if rank > 0 else torch.zeros_like(A[:, 0])
        shifted = torch.cat([prv.unsqueeze(1), A[:, :-1]], 1)
    return transpose(shifted, structure)


def sp_adjoint_scan(A, g, structure, reverse=False, group=None, backend="auto"):
    """Cotangents of a sequence-parallel scan (of direction ``reverse``) w.r.t. its outputs."""
    At = shifted_adjoint_transitions(A, structure, reverse, group)
    lam, _ = sp_scan(At, g, None, structure, reverse=not reverse, group=group, backend=backend)
    return lam


def allreduce_gradients(module: torch.nn.Module, group=None) -> None:
    """Sum parameter gradients over the ranks of a sequence-parallel group.

    With sequence parallelism each rank's backward gives the gradient of its own time chunk's
    share of the loss: the full gradient is their sum (DDP would average instead).
    """
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)


def boundary_state(H: torch.Tensor, h0: torch.Tensor, group) -> torch.Tensor:
    """The state entering this rank's chunk: h0 on rank 0, the previous rank's last state else."""
    rank, _ = rank_and_size(group)
    lasts = all_gather(H[:, -1], group)
    return h0 if rank == 0 else lasts[rank - 1]


def any_rank(flag: torch.Tensor, group) -> torch.Tensor:
    """Elementwise OR of a bool tensor over ranks."""
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.bool()


def max_over_ranks(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


__all__ = ["all_gather", "allreduce_gradients", "sp_adjoint_scan", "sp_scan", "transfer"]
