"""`linear_scan`: solve h_t = A_t h_{t-1} + b_t over T, with backend dispatch and autograd."""
from __future__ import annotations

import torch

from . import op
from ..kernels.dispatch import check_backend
from ..parallel import LOCAL, context_for
from ..structure import Structure, as_structure


class _LinearScanFn(torch.autograd.Function):
    """``linear_scan`` on a context's chunk (sequence parallelism, custom structures); backward:
    :func:`pararnn.op.scan_grads` with the context's adjoint scan. A local scan of a built-in
    structure is the custom op ``pararnn::scan`` instead, with the same backward."""

    @staticmethod
    def forward(ctx, A, b, h0, structure, reverse, backend, pctx):
        h, h_in = pctx.scan(A, b, h0, structure, reverse=reverse, backend=backend)
        ctx.structure, ctx.reverse, ctx.backend, ctx.pctx = structure, reverse, backend, pctx
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(A, h, h0, h_in)
        return h

    @staticmethod
    def backward(ctx, g):
        A, h, h0, h_in = ctx.saved_tensors
        pctx = ctx.pctx
        if torch.is_grad_enabled() and pctx is not LOCAL:
            raise NotImplementedError("double backward through a sequence-parallel linear_scan is not "
                                      "supported; run that part without process_group")
        gA, lam, gh0 = op.scan_grads(
            A, h, h_in, g, ctx.structure, ctx.reverse, ctx.backend, ctx.needs_input_grad[0],
            ctx.has_h0 and ctx.needs_input_grad[2],
            adjoint=lambda A, g: pctx.adjoint_scan(A, g, ctx.structure, reverse=ctx.reverse, backend=ctx.backend),
            differentiable_scan=lambda A, b, reverse: linear_scan(A, b, None, ctx.structure, reverse=reverse,
                                                                  backend=ctx.backend))
        if gh0 is not None and not pctx.owns_h0(ctx.reverse):  # h0 only enters the chunk that starts the sequence
            gh0 = torch.zeros_like(gh0)
        return gA, lam, gh0, None, None, None, None


def _check_h0(h0: torch.Tensor, shape: tuple, b: torch.Tensor, what: str) -> None:
    """One check of ``h0`` for both layouts (padded and packed): shape, then b's dtype and device."""
    _check_tensor("h0", h0)
    if tuple(h0.shape) != shape:
        raise ValueError(f"{what} = {list(shape)}, got {list(h0.shape)}")
    if h0.dtype != b.dtype or h0.device != b.device:
        raise TypeError(f"h0 must match b's dtype and device ({b.dtype}, {b.device}), got ({h0.dtype}, {h0.device})")


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> torch.Tensor:
    """Validate fla-style cumulative offsets ``[N+1]`` for a packed ``[1, total, ...]`` batch; on CPU."""
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch must be packed as [1, total, ...], got B = {B}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [N+1] of cumulative offsets (0, ..., total)")
    cu = cu_seqlens.detach().to("cpu", torch.long)
    if int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to total = {T} (every sequence >= 1 step), "
                         f"got {cu.tolist()}")
    return cu


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must be a floating or complex tensor, got dtype {t.dtype}")


def linear_scan(
    A: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    structure: Structure | str = "diagonal",
    reverse: bool = False,
    backend: str = "auto",
    process_group=None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve the linear recurrence ``h_t = A_t h_{t-1} + b_t`` for all t as one parallel reduction.

    Args:
        A: transitions. ``[B, T, d]`` for ``"diagonal"``, ``[B, T, d/k, k, k]`` for
            ``pararnn.Block(k)``, ``[B, T, d, d]`` for ``"dense"``. Complex dtypes are supported.
        b: inputs ``[B, T, d]``, same dtype and device as A.
        h0: initial state ``[B, d]`` (default zeros). With ``reverse=True`` it is ``h_{T+1}``.
        structure: ``"diagonal"``, ``pararnn.Block(k)``, ``"dense"`` or a ``pararnn.Structure``.
        reverse: solve the reverse-time recurrence ``h_t = A_t h_{t+1} + b_t`` instead.
        backend: ``"auto"`` (Triton on CUDA where a kernel exists, else ``"assoc"``; compiled
            numba on CPU; else the loop), ``"cpu"``, ``"triton"``, ``"assoc"`` (a log-depth
            scan in batched matmuls, any device and structure) or ``"reference"`` (the plain
            PyTorch loop).
        process_group: a ``torch.distributed`` group for sequence parallelism: every rank passes
            its own consecutive time chunk (rank order = time order; chunk lengths may differ)
            and the same h0; the result is this rank's chunk. See :mod:`pararnn.distributed`.
            A :class:`pararnn.parallel.ParallelContext` is accepted too.
        cu_seqlens: packed sequences, flash-linear-attention's convention: ``b`` is ``[1, total, d]``
            and ``cu_seqlens [N+1]`` holds the cumulative offsets (0, ..., total); ``h0`` is
            ``[N, d]`` (or None). Each sequence starts from its own h0: in the scan, a zero
            transition at its first step (its last with ``reverse``). The final state of
            sequence n is ``h[0, cu[n+1] - 1]`` (``h[0, cu[n]]`` with ``reverse``).

    Returns:
        h: ``[B, T, d]``. Differentiable in A, b and h0.
    """
    _check_tensor("A", A)
    _check_tensor("b", b)
    if b.dim() != 3:
        raise ValueError(f"b must be [B, T, d], got shape {tuple(b.shape)}")
    B, T, d = b.shape
    if T == 0:
        raise ValueError("b has T = 0 time steps; linear_scan needs T >= 1")
    structure = as_structure(structure, d)
    want = (B, T, *structure.storage_shape(d))
    if tuple(A.shape) != want:
        raise ValueError(
            f"A must have shape {list(want)} for structure {structure!s} and b of shape "
            f"{list(b.shape)}, got {list(A.shape)}"
        )
    if A.dtype != b.dtype:
        raise TypeError(f"A and b must share a dtype, got A: {A.dtype}, b: {b.dtype}")
    if A.device != b.device:
        raise ValueError(f"A and b must be on one device, got A: {A.device}, b: {b.device}")
    if cu_seqlens is not None:
        if process_group is not None:
            raise ValueError("cu_seqlens cannot be combined with process_group")
        cu = check_cu_seqlens(cu_seqlens, B, T)
        if h0 is not None:
            _check_h0(h0, (len(cu) - 1, d), b, "with cu_seqlens, h0 must be [N, d]")
        # a sequence's first visited step reads its own h0: zero transition, A h0 folded into b
        first = ((cu[1:] - 1) if reverse else cu[:-1]).to(A.device)  # [N]
        A0 = A[0, first]
        A = A.index_put((torch.zeros_like(first), first), torch.zeros_like(A0))
        if h0 is not None:
            b = b.index_put((torch.zeros_like(first), first), b[0, first] + structure.matvec(A0, h0))
        h0 = None
    if h0 is not None:
        _check_h0(h0, (B, d), b, "h0 must be [B, d]")
    check_backend(backend)
    pctx = context_for(process_group)
    spec = op.op_structure(structure)
    if pctx is LOCAL and spec is not None:  # the custom op: torch.compile sees no numba or Triton
        return op.scan(A, b, h0, spec, bool(reverse), False, backend)
    return _LinearScanFn.apply(A, b, h0, structure, bool(reverse), backend, pctx)
