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

import functools

import torch
import torch.distributed as dist

from .kernels.dispatch import scan_dispatch
from .kernels.tsplit import composite_transition
from .parallel import ParallelContext, register_group_context
from .structure import shifted_adjoint_transitions as local_shifted_adjoint_transitions
from .structure import as_structure


def rank_and_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's copy of ``t`` (same shape everywhere), in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def transfer(A: torch.Tensor, structure, d: int, reverse: bool, backend: str = "auto") -> torch.Tensor:
    """The composite transition of a whole chunk, in storage form ``[B, *jac]``
    (:func:`pararnn.kernels.tsplit.composite_transition` with this backend's scan)."""
    return composite_transition(functools.partial(scan_dispatch, backend=backend), A,
                                as_structure(structure, d), d, reverse)


def sp_scan(A, b, h0, structure, reverse=False, group=None, backend="auto"):
    """Sequence-parallel ``h_t = A_t h_{t∓1} + b_t`` on this rank's chunk.

    Args:
        A: ``[B, T_local, *jac]`` this rank's transitions, in the structure's storage form.
        b: ``[B, T_local, d]`` this rank's inputs.
        h0: ``[B, d]`` the global initial state, used by the first rank in scan order (rank 0,
            or the last rank for ``reverse``); None: zeros.
        structure: a :class:`pararnn.Structure` or its name.
        reverse: scan from the end of the sequence (``h_t = A_t h_{t+1} + b_t``).
        group: the process group (None: the default group).
        backend: the local scan's backend (as :func:`pararnn.linear_scan`'s).

    Returns:
        ``(h [B, T_local, d], h_in [B, d])``, h_in being the state entering this chunk.
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
        h_in = structure.matvec(Ps[q], h_in) + edges[q]
    if rank != first:
        local = local + scan_dispatch(A, torch.zeros_like(b), h_in, structure, reverse=reverse, backend=backend)
    return local, h_in


def shifted_adjoint_transitions(A, structure, reverse, group):
    """``A'_t = A_{t±1}^H`` across rank boundaries, for the adjoint of a (reverse) scan: the last
    local step reads the next rank's first transition (the previous rank's last with ``reverse``;
    zero at the sequence's end)."""
    rank, W = rank_and_size(group)
    edges = all_gather(A[:, -1 if reverse else 0], group)
    neighbour = rank - 1 if reverse else rank + 1
    edge = edges[neighbour] if 0 <= neighbour < W else None
    return local_shifted_adjoint_transitions(A, structure, reverse, edge)


def sp_adjoint_scan(A, g, structure, reverse=False, group=None, backend="auto"):
    """Cotangents of a sequence-parallel scan (of direction ``reverse``) with respect to its b.

    Args:
        A: ``[B, T_local, *jac]`` the forward scan's transitions on this rank.
        g: ``[B, T_local, d]`` the cotangents of its outputs h.
        structure: a :class:`pararnn.Structure` or its name.
        reverse: the forward scan's direction.
        group: the process group (None: the default group).
        backend: the local scan's backend.

    Returns:
        ``[B, T_local, d]``: the cotangents of b (those of A are ``λ_t h_{t∓1}^H``).
    """
    At = shifted_adjoint_transitions(A, structure, reverse, group)
    lam, _ = sp_scan(At, g, None, structure, reverse=not reverse, group=group, backend=backend)
    return lam


def allreduce_gradients(module: torch.nn.Module, group=None) -> None:
    """Sum parameter gradients over the ranks of a sequence-parallel group.

    With sequence parallelism each rank's backward gives the gradient of its own time chunk's
    share of the loss: the full gradient is their sum (DDP would average instead).

    Args:
        module: the model whose ``.grad`` fields are summed in place.
        group: the process group (None: the default group).
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


def link_states(F, P, s, h0, structure, group):
    """This rank's next guess of its entering state: ``s'_{q+1} = F_q + P_q (s'_q - s_q)`` folded
    from rank 0 (whose entering state is h0) over the ranks before this one."""
    rank, _ = rank_and_size(group)
    Fs, Ps, ss = all_gather(F, group), all_gather(P, group), all_gather(s, group)
    cur = h0 if rank == 0 else ss[0]  # rank 0 solves from its own h0: its guess is exact
    for q in range(rank):
        cur = Fs[q] + structure.matvec(Ps[q], cur - ss[q])
    return cur


def link_cotangents(g, P, structure, group):
    """The cotangent of this rank's final state from the ranks after it:
    ``μ_q = g_{q+1} + P_{q+1}^H μ_{q+1}``, folded from the last rank (μ = 0 there)."""
    rank, W = rank_and_size(group)
    gs, Ps = all_gather(g, group), all_gather(P, group)
    mu = torch.zeros_like(g)
    for q in range(W - 1, rank, -1):
        mu = gs[q] + structure.matvec(structure.transpose(Ps[q]), mu)
    return mu


class SequenceParallel(ParallelContext):
    """The sequence-parallel context: this rank holds one consecutive time chunk of every sequence.

    ``pararnn.RNN(cell, process_group=group)`` and ``linear_scan(..., process_group=group)`` build
    it from a group; it can also be passed as ``process_group=SequenceParallel(group)``.
    """

    supports_fallback = False  # a sequential recompute would need every earlier rank's states

    def __init__(self, group):
        self.group = group

    def scan(self, A, b, h0, structure, reverse=False, backend="auto", out=None, base=None):
        h, h_in = sp_scan(A, b, h0, structure, reverse, self.group, backend)
        if base is not None:
            h = h.add_(base)  # sp_scan's own result
        return (h if out is None else out.copy_(h)), h_in

    def adjoint_scan(self, A, g, structure, reverse=False, backend="auto", out=None):
        if torch.is_grad_enabled():
            raise NotImplementedError("double backward is not supported with sequence parallelism")
        lam = sp_adjoint_scan(A, g, structure, reverse, self.group, backend)
        return lam if out is None else out.copy_(lam)

    def boundary_state(self, H, h0):
        return boundary_state(H, h0, self.group)

    def time_extent(self, T_local, device):
        sizes = all_gather(torch.tensor([T_local], device=device), self.group)
        rank, _ = rank_and_size(self.group)
        return int(sum(int(t) for t in sizes[:rank])), int(sum(int(t) for t in sizes))

    def owns_h0(self, reverse=False):
        rank, W = rank_and_size(self.group)
        return rank == (W - 1 if reverse else 0)

    def size(self):
        return rank_and_size(self.group)[1]

    def link_states(self, F, P, s, h0, structure):
        return link_states(F, P, s, h0, structure, self.group)

    def link_cotangents(self, g, P, structure):
        return link_cotangents(g, P, structure, self.group)

    def any(self, flag):
        return any_rank(flag, self.group)

    def max(self, t):
        return max_over_ranks(t, self.group)


register_group_context(SequenceParallel)

__all__ = ["allreduce_gradients", "sp_adjoint_scan", "sp_scan"]
