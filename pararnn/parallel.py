"""Where a solve runs: the context that owns the scans, the boundary state and the reductions.

The Newton solver, the adjoint and :func:`pararnn.linear_scan` never ask whether they run in one
process or across a sequence-parallel group: they call a :class:`ParallelContext`. This module
holds the local one; ``pararnn.distributed`` defines the sequence-parallel one (all the
communication lives there) and registers it, so ``process_group=group`` finds it. A new kind of
parallelism is a new subclass, passed as ``process_group=`` directly or registered with
:func:`register_group_context`.
"""
from __future__ import annotations

from typing import Callable

import torch

from .kernels import dispatch


class ParallelContext:
    """One process holds all of T (the local context; the base of every other one).

    Every method takes this process's time chunk: ``A [B, T_local, *jac]``, ``b, g [B, T_local, d]``.
    """

    #: whether a non-converged sequence may be recomputed sequentially on its own
    supports_fallback: bool = True

    def scan(self, A, b, h0, structure, reverse=False, backend="auto", out=None, base=None):
        """``h_t = A_t h_{t∓1} + b_t`` over this chunk. Returns ``(h [B, T, d], h_in [B, d] | None)``:
        h_in is the state entering the chunk (None: zeros). With ``base [B, T, d]``, ``base + h``
        in place of h (:func:`pararnn.kernels.dispatch.scan`)."""
        return dispatch.scan(A, b, h0, structure, reverse=reverse, backend=backend, out=out, base=base), h0

    def adjoint_scan(self, A, g, structure, reverse=False, backend="auto", out=None):
        """Cotangents ``λ [B, T, d]`` of the outputs of a scan of direction ``reverse`` with transitions
        A, given the output gradients g: ``λ_t = g_t + A_{t±1}^H λ_{t±1}`` (the opposite direction)."""
        return dispatch.scan(A, g, None, structure, reverse=not reverse, adjoint=True, backend=backend, out=out)

    def boundary_state(self, H: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """The state this chunk's first step reads: h0 here."""
        return h0

    def time_extent(self, T_local: int, device) -> tuple[int, int]:
        """``(offset, total)``: where this chunk starts in the whole sequence, and the whole length."""
        return 0, T_local

    def owns_h0(self, reverse: bool = False) -> bool:
        """Whether this chunk starts the sequence (so h0 enters it and gets a gradient)."""
        return True

    def size(self) -> int:
        """How many processes share the sequence."""
        return 1

    def link_states(self, F, P, s, h0, structure) -> torch.Tensor:
        """One Newton step on the states entering each process's time chunk (for ``chunk_size``
        under sequence parallelism): given every process's chunk solved from its guess ``s [B, d]``,
        its final state ``F [B, d]`` and transition ``P = dF/ds [B, *jac]``, the new guess
        ``s'_{q+1} = F_q + P_q (s'_q - s_q)``, ``s'_0 = h0``. Here: h0."""
        return h0

    def link_cotangents(self, g, P, structure) -> torch.Tensor:
        """The cotangent ``μ [B, d]`` of this process's final state from the later ones, given each
        one's cotangent ``g`` of its entering state with nothing entering its end:
        ``μ_q = g_{q+1} + P_{q+1}^H μ_{q+1}``, zero for the last. Here: zeros."""
        return torch.zeros_like(g)

    def any(self, flag: torch.Tensor) -> torch.Tensor:
        """Elementwise OR of a bool tensor over the context's processes."""
        return flag

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise max over the context's processes."""
        return t


LOCAL = ParallelContext()

_group_factory: Callable[[object], ParallelContext] | None = None


def register_group_context(factory: Callable[[object], ParallelContext]) -> None:
    """Make ``process_group=group`` build ``factory(group)`` (pararnn.distributed registers itself)."""
    global _group_factory
    _group_factory = factory


def context_for(process_group) -> ParallelContext:
    """The context for a ``process_group`` option: None -> local, a context -> itself, a
    torch.distributed group -> the registered sequence-parallel context."""
    if process_group is None:
        return LOCAL
    if isinstance(process_group, ParallelContext):
        return process_group
    if _group_factory is None:  # pararnn.distributed registers itself on import
        import importlib

        importlib.import_module(".distributed", __package__)
    return _group_factory(process_group)


__all__ = ["LOCAL", "ParallelContext", "context_for", "register_group_context"]
