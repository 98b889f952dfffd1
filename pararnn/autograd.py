"""The differentiable parallel solve: Newton without a graph, then one adjoint scan for the gradients."""
from __future__ import annotations

import torch

from . import compat
from .parallel import context_for
from .solver.compile import can_compile, compiled_piece, resolve_compile, static_features
from .solver.evaluate import contiguous_pieces, graph_piece
from .solver.fallback import handle_failure
from .solver.newton import newton_solve
from .solver.options import SolverOptions
from .verify import verify_once
from .workspace import workspace


class _Adjoint(torch.autograd.Function):
    """Identity on the solution whose backward is the adjoint scan.

    Inputs: the converged states ``H [B, T, d]`` (no grad), ``J [B, T, *jac]`` (df/dh at H), the
    initial state ``h0 [B, d]`` (or None where this solve does not own it) and the pieces
    ``f_p [N_p, d]`` of one graph-carrying evaluation ``f(h_{t-1}, u_t)`` at the solution, one per
    ``(b0, b1, t0, t1)`` of ``pieces`` (rows in (b, t) order). Output: H. Backward: the state
    cotangents solve ``λ_t = g_t + J_{t+1}^H λ_{t+1}`` (one reverse scan); λ, cut into the same
    pieces, is the cotangent of each f_p, so autograd's ordinary vjp of ``step`` delivers the
    gradients of u and of anything else step depends on (parameters, functional_call swaps,
    closures), and h0's is ``J_1^H λ_1`` (its vjp through the first step). Nothing from the Newton
    iterations is kept.
    """

    @staticmethod
    def forward(ctx, H, J, h0, structure, backend, pctx, pieces, *f_pieces):
        ctx.save_for_backward(J)
        ctx.structure, ctx.backend, ctx.pctx, ctx.pieces = structure, backend, pctx, pieces
        return H.clone()  # an ordinary tensor (H is a view of the solver's [B, T+1, d] buffer)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "pararnn: double backward (create_graph=True) through a parallel solve is not supported: "
                "the Jacobians of the solve are not differentiable. Use mode='sequential' for "
                "higher-order gradients.")
        (J,) = ctx.saved_tensors
        st = ctx.structure
        lam = ctx.pctx.adjoint_scan(J, g.contiguous(), st, backend=ctx.backend)  # [B, T, d]
        gh0 = st.matvec(st.transpose(J[:, 0]), lam[:, 0]) if ctx.needs_input_grad[2] else None  # [B, d]
        f_grads = split_pieces(lam, ctx.pieces) if ctx.pieces else []  # no pieces: only h0 wants a gradient
        return (None, None, gh0, None, None, None, None, *f_grads)


class OwnTensor(torch.autograd.Function):
    """Identity that returns a tensor of its own over the same memory (not a view: no ``_base``;
    the same version counter, so autograd still sees an in-place write to the input)."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, g):
        return g


def parallel_solve(cell, u: torch.Tensor, h0: torch.Tensor, opts: SolverOptions, warn=None,
                   mask: torch.Tensor | None = None, on_jacobians=None, replay: list | None = None):
    """Differentiable parallel solve: ``(H [B, T, d], SolverInfo)``.

    Newton runs without a graph, then the failure policy (``opts.on_fail``) is applied. If
    gradients are wanted, one more evaluation of ``step`` at the solution (in pieces, see
    :func:`pararnn.solver.evaluate.contiguous_pieces`; compiled with ``compile_cell``) carries the graph,
    and :class:`_Adjoint` turns the incoming state gradients into its cotangents with one
    reverse-time scan. ``mask [B, T]`` (False = padded step) holds the state there.
    ``on_jacobians(J)``, if given, is called with ``J [B, T, *jac]`` at the solution (no grad; valid
    during the call only: without gradients J's buffer is kept for the next solve).
    ``replay``: repeat the steps of a solve that converged (:func:`pararnn.solver.newton.replay_steps`).
    """
    if under_functional_ad():
        raise RuntimeError(TORCH_FUNC_MSG)
    opts = resolve_compile(opts, cell, h0, *u.shape[:2])
    pctx = context_for(opts.process_group)
    if opts.check_cell:
        verify_once(cell, u, h0)
    inference = not torch.is_grad_enabled()
    with torch.no_grad(), workspace(u.device) as ws:
        # S: [B, T+1, d] = (h0, h_1..h_T). Without gradients S and J die here too: kept buffers.
        S, J, info = newton_solve(cell, u, h0, opts, pctx, mask, replay, ws=ws, outputs_from_ws=inference)
        handle_failure(cell, u, S, J, info, opts, pctx, mask=mask, **({} if warn is None else {"warn": warn}))
        if on_jacobians is not None:
            on_jacobians(J)
        if inference:
            return S[:, 1:].clone(), info  # not a view of the solver's buffer: y.view(), y += 1 work
    H = S[:, 1:]
    B, T, d = H.shape
    h0 = h0 if pctx.owns_h0() and h0.requires_grad else None  # h_{-1} = h0: its gradient is J_1^H λ_1
    pieces = contiguous_pieces(B, T, d, opts.eval_chunk)
    piece = compiled_piece(graph_piece, cell) if opts.compile_cell and can_compile(H) else graph_piece
    f_pieces = []
    compiled = piece is not graph_piece
    for (b0, b1, t0, t1), u_p in zip(pieces, split_pieces(u, pieces, own_base=compiled)):
        N = (b1 - b0) * (t1 - t0)
        hp = S[b0:b1, t0:t1].reshape(N, d)  # previous states, no grad (a copy for several rows)
        m = None if mask is None else mask[b0:b1, t0:t1].reshape(N)  # padded steps hold the state
        if compiled:  # hp, m detached: no view base for dynamo to guard on (see split_pieces)
            hp, m = hp.detach(), None if m is None else m.detach()
            static_features(1, hp, u_p)
        f = piece(cell, hp, u_p, m)  # [N, d]
        if not f.requires_grad:
            if h0 is None:
                return H.clone(), info  # nothing upstream wants a gradient
            f_pieces, pieces = [], []  # only h0 does
            break
        f_pieces.append(f)
    return _Adjoint.apply(H, J, h0, cell.get_structure(), opts.backend, pctx, pieces, *f_pieces), info


def split_pieces(x: torch.Tensor, pieces: list[tuple[int, int, int, int]], own_base: bool = False) -> list[torch.Tensor]:
    """``x [B, T, *]`` cut into the pieces ``[N_p, *]`` of :func:`pararnn.solver.evaluate.contiguous_pieces`
    (runs of memory, rows in (b, t) order) by one split of ``x`` flattened to ``[B·T, *]``, so that
    autograd's backward is one cat (a slice's backward writes a full-size tensor per slice). One
    piece is the flattened view itself, whose backward is a view too (a split would copy).

    ``own_base``: the flattened ``[B·T, *]`` is first made a tensor of its own (:class:`OwnTensor`, no
    copy), so the pieces are views of it and not of whatever ``x`` is a view of. A compiled piece
    guards on its input's view base, and the base of a linear layer's output is ``[T, *]`` at
    batch 1 and ``[B, T, *]`` above it: without this a batch of 1 compiled graphs of its own."""
    flat = x.reshape(-1, *x.shape[2:])
    flat = OwnTensor.apply(flat) if own_base else flat
    if len(pieces) == 1:
        return [flat]
    return list(flat.split([(b1 - b0) * (t1 - t0) for b0, b1, t0, t1 in pieces]))


def under_functional_ad() -> bool:
    """Whether a torch.func transform or a forward-mode AD level (``torch.autograd.forward_ad``) is
    active: a parallel solve cannot run there (:data:`TORCH_FUNC_MSG`); only the loop traces."""
    return compat.under_torch_func() or compat.forward_ad_active()


TORCH_FUNC_MSG = (
    "pararnn: torch.func transforms (grad, vmap, jacrev, jvp, functional_call under them) and forward-mode "
    "AD (torch.autograd.forward_ad) cannot trace a parallel solve (its Newton loop and scans run outside "
    "autograd's functional tracing). Use mode='sequential' (or 'auto') there, or ordinary autograd "
    "(loss.backward(), torch.autograd.grad), which the parallel solve supports.")


