"""The strong sequential loop, and the failure policy that falls back to it."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..parallel import LOCAL, ParallelContext
from .evaluate import evaluate, hold_padded
from .options import ConvergenceError, ConvergenceWarning, SolverInfo, SolverOptions


def sequential_solve(step: Callable, u: torch.Tensor, h0: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """The strong sequential loop: ``h_t = step(h_{t-1}, u_t)`` over ``u.unbind(1)``.

    Differentiable by plain autograd.

    Args:
        step: ``step(h [B, d], u_t [B, *]) -> [B, d]`` (a cell's :meth:`~pararnn.Cell.step`).
        u: ``[B, T, *]`` prepared inputs.
        h0: ``[B, d]`` initial state.
        mask: ``[B, T]`` bool or None (False = a padded step, which keeps the state).

    Returns:
        ``[B, T, d]``: the states h_1..h_T.
    """
    h = h0
    out = []
    for t, u_t in enumerate(u.unbind(1)):
        h = hold_padded(step(h, u_t), None, h, None if mask is None else mask[:, t], None)[0]
        out.append(h)
    return torch.stack(out, dim=1)


def handle_failure(cell, u, S, J, info: SolverInfo, opts: SolverOptions, ctx: ParallelContext = LOCAL,
                   warn=warnings.warn, mask: torch.Tensor | None = None) -> None:
    """The failure policy, applied by the caller of :func:`newton_solve` to its result.

    ``"raise"``: ConvergenceError. ``"warn"``: a ConvergenceWarning, the last iterate kept.
    ``"fallback"``: the non-converged sequences (only those) are recomputed sequentially in place
    (S, J updated; ``info.fell_back`` set), with a ConvergenceWarning. Where the context cannot
    fall back (sequence parallelism) ``"fallback"`` raises. Messages are fixed texts: the numbers
    are on ``info`` (residuals, converged, fell_back), so repeated warnings are recognised as one.
    """
    if info.all_converged:
        return
    bad = (~info.converged).nonzero().flatten()
    if opts.on_fail == "raise" or (opts.on_fail == "fallback" and not ctx.supports_fallback):
        raise ConvergenceError(
            f"Newton did not converge for {bad.numel()}/{len(info.converged)} sequences in "
            f"{info.iterations} iterations (max_iters={opts.max_iters}); residual history "
            f"{[f'{x:.2g}' for x in info.residuals]}. Use on_fail='fallback' or mode='sequential', "
            "raise max_iters, or damp the cell.")
    if opts.on_fail == "warn":
        warn(ConvergenceWarning(NOT_CONVERGED_MSG))
        return
    warn(ConvergenceWarning(FELL_BACK_MSG))
    H, h0 = S[:, 1:], S[:, 0]
    mb = None if mask is None else mask[bad]
    H[bad] = sequential_solve(cell.step, u[bad], h0[bad], mb)
    Jb, rb = J[bad], torch.empty_like(H[bad])
    evaluate(cell, S[bad], u[bad], rb, Jb, opts.eval_chunk, mask=mb)
    J[bad] = Jb
    info.fell_back[bad] = True


NOT_CONVERGED_MSG = ("pararnn: Newton did not converge for some sequences; the last iterate is returned "
                     "(see rnn.last_info for residuals and which sequences)")
FELL_BACK_MSG = ("pararnn: Newton did not converge for some sequences; those were recomputed sequentially "
                 "(see rnn.last_info for residuals and which sequences)")

