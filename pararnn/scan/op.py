"""The scans as torch.library custom ops: what torch.compile sees instead of numba or Triton.

``pararnn::scan(A, b, h0, structure, reverse, adjoint, backend)`` runs :func:`pararnn.kernels.dispatch.scan`
(numba on CPU, Triton on CUDA, the PyTorch loop otherwise) on real tensors. Its fake (meta)
implementation gives the output shape ``[B, T, d]`` without running anything, so dynamo and
inductor never trace into the kernels, and its registered autograd is the adjoint of
:func:`pararnn.linear_scan`: one reverse scan and an outer product, differentiable again under
``create_graph=True``. ``structure`` travels as its string (``str(Block(4))``), the form an
operator schema can carry.
"""
from typing import Optional

import torch

from ..kernels import dispatch
from ..structure import Structure, from_str, shifted_adjoint_transitions


@torch.library.custom_op("pararnn::scan", mutates_args=())
def scan(A: torch.Tensor, b: torch.Tensor, h0: Optional[torch.Tensor], structure: str, reverse: bool,
         adjoint: bool, backend: str) -> torch.Tensor:
    """``h [B, T, d]`` of ``h_t = A_t h_{t∓1} + b_t`` (``adjoint``: ``A_{t±1}^H``, see
    :func:`pararnn.kernels.dispatch.scan`), with ``A [B, T, *jac]``, ``b [B, T, d]``, ``h0 [B, d]`` or None."""
    return dispatch.scan(A, b, h0, from_str(structure), reverse=reverse, adjoint=adjoint, backend=backend)


@scan.register_fake
def _scan_fake(A, b, h0, structure, reverse, adjoint, backend):
    return b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    A, b, h0, structure, reverse, adjoint, backend = inputs
    ctx.structure, ctx.reverse, ctx.adjoint, ctx.backend = structure, reverse, adjoint, backend
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(A, output, h0)


def _scan_backward(ctx, g):
    A, h, h0 = ctx.saved_tensors
    structure = from_str(ctx.structure)
    if not ctx.adjoint:
        gA, gb, gh0 = scan_grads(A, h, h0, g, structure, ctx.reverse, ctx.backend,
                                 ctx.needs_input_grad[0], ctx.has_h0 and ctx.needs_input_grad[2])
        return gA, gb, gh0, None, None, None, None
    # an adjoint scan is the plain scan of the shifted, conjugate-transposed transitions (h0 is None)
    A_adj, pull = torch.func.vjp(lambda a: shifted_adjoint_transitions(a, structure, not ctx.reverse), A)
    gA_adj, gb, _ = scan_grads(A_adj, h, None, g, structure, ctx.reverse, ctx.backend, ctx.needs_input_grad[0], False)
    return (None if gA_adj is None else pull(gA_adj)[0]), gb, None, None, None, None, None


scan.register_autograd(_scan_backward, setup_context=_setup_context)


def scan_grads(A, h, h_in, g, structure: Structure, reverse: bool, backend: str, need_A: bool, need_h0: bool,
               adjoint=None, differentiable_scan=None):
    """``(dL/dA, dL/db, dL/dh0)`` of a scan ``h = scan(A, b, h_in)`` given ``g = dL/dh``.

    ``dL/db = λ`` (the adjoint scan), ``dL/dA_t = λ_t ⊗ conj(h_prev)``, ``dL/dh0 = A_first^H λ_first``.
    ``adjoint(A, g)`` computes λ (default: the local adjoint scan). Under ``create_graph=True`` λ
    comes from a differentiable scan of the shifted, transposed transitions instead, so gradients
    of gradients are exact: ``differentiable_scan(A, b, reverse)`` (default: this op, whose
    autograd is this function; a structure the op cannot carry passes its own).
    """
    g = g.contiguous()
    if torch.is_grad_enabled():
        A_adj = shifted_adjoint_transitions(A, structure, reverse)
        if differentiable_scan is None:
            lam = scan(A_adj, g, None, str(structure), not reverse, False, backend)
        else:
            lam = differentiable_scan(A_adj, g, not reverse)
    elif adjoint is not None:
        lam = adjoint(A, g)
    else:
        lam = scan(A, g, None, str(structure), not reverse, True, backend)
    gA = gh0 = None
    if need_A:
        init = h_in if h_in is not None else torch.zeros_like(h[:, 0])
        if reverse:
            hprev = torch.cat([h[:, 1:], init.unsqueeze(1)], dim=1)
        else:
            hprev = torch.cat([init.unsqueeze(1), h[:, :-1]], dim=1)
        gA = structure.outer(lam, hprev)
    if need_h0:
        edge = -1 if reverse else 0
        gh0 = structure.matvec(structure.transpose(A[:, edge]), lam[:, edge])
    return gA, lam, gh0


def op_structure(structure: Structure) -> str | None:
    """``str(structure)`` if the op can carry it (a built-in structure), else None."""
    spec = str(structure)
    return spec if from_str(spec) == structure else None


__all__ = ["op_structure", "scan", "scan_grads"]
