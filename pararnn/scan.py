"""`linear_scan`: solve h_t = A_t h_{t-1} + b_t over T, with backend dispatch and autograd."""
from __future__ import annotations

import torch

from .kernels import cpu as _cpu
from .kernels.reference import scan_reference
from .structure import Structure, jacobian_shape, matvec, normalize_structure, transpose

BACKENDS = ("auto", "reference", "cpu", "triton")


def _triton_module():
    try:
        from .kernels import triton_scan
    except ImportError:  # pragma: no cover - triton missing
        return None
    return triton_scan if triton_scan.HAVE_TRITON else None


def resolve_backend(backend: str, A: torch.Tensor, b: torch.Tensor, structure: Structure = "diagonal") -> str:
    """Pick the concrete backend for these tensors.

    ``"auto"``: Triton for CUDA tensors when a kernel exists for the structure and dtype, the
    compiled numba path for CPU tensors, and the plain PyTorch loop otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "cpu" and not _cpu.HAVE_NUMBA:
            raise RuntimeError("backend='cpu' needs numba, which is not importable here")
        if backend == "triton" and _triton_module() is None:
            raise RuntimeError("backend='triton' needs triton, which is not importable here")
        return backend
    if b.device.type == "cuda":
        tri = _triton_module()
        if tri is not None and tri.supports(structure, b.dtype, b.shape[-1]):
            return "triton"
        return "reference"
    if _cpu.available(A, b):
        return "cpu"
    return "reference"


def scan_dispatch(A, b, h0, structure, reverse=False, adjoint=False, backend="auto", out=None):
    """Unchecked fast entry used by the engine (inputs already validated). Returns ``[B, T, d]``."""
    name = resolve_backend(backend, A, b, structure)
    if name == "cpu":
        return _cpu.scan_cpu(A, b, h0, structure, reverse, adjoint, out=out)
    if name == "triton":
        return _triton_module().scan_triton(A, b, h0, structure, reverse, adjoint, out=out)
    res = scan_reference(A, b, h0, structure, reverse, adjoint)
    return res if out is None else out.copy_(res)


def _outer_grad_A(lam: torch.Tensor, hprev: torch.Tensor, structure: Structure) -> torch.Tensor:
    """dL/dA_t for h_t = A_t h_prev + b_t, given the adjoint lam_t: lam_t ⊗ conj(h_prev)."""
    if structure == "diagonal":
        return lam * hprev.conj()
    if structure == "dense":
        return lam.unsqueeze(-1) * hprev.conj().unsqueeze(-2)
    k = structure.k
    lb = lam.reshape(*lam.shape[:-1], -1, k)
    hb = hprev.reshape(*hprev.shape[:-1], -1, k)
    g = lb.unsqueeze(-1) * hb.conj().unsqueeze(-2)  # [..., m, k, k]
    return g.sum(-3) if structure.shared else g


def _transition_grads(ctx, A, h, init, lam):
    """``(dL/dA, dL/dh0)`` of a scan from its outputs ``h``, its incoming state ``init`` and the
    adjoint ``lam``: ``dL/dA_t = λ_t ⊗ conj(h_prev)``, ``dL/dh0 = A_first^H λ_first``."""
    st, rev = ctx.structure, ctx.reverse
    gA = gh0 = None
    if ctx.needs_input_grad[0]:
        if rev:
            hprev = torch.cat([h[:, 1:], init.unsqueeze(1)], dim=1)
        else:
            hprev = torch.cat([init.unsqueeze(1), h[:, :-1]], dim=1)
        gA = _outer_grad_A(lam, hprev, st)
    if ctx.has_h0 and ctx.needs_input_grad[2]:
        edge = -1 if rev else 0
        gh0 = matvec(transpose(A[:, edge], st), lam[:, edge], st)
    return gA, gh0


class _LinearScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, b, h0, structure, reverse, backend):
        h = scan_dispatch(A, b, h0, structure, reverse=reverse, backend=backend)
        ctx.structure, ctx.reverse, ctx.backend = structure, reverse, backend
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(A, h, h0 if h0 is not None else h.new_zeros(0))
        return h

    @staticmethod
    def backward(ctx, g):
        A, h, h0 = ctx.saved_tensors
        st, rev = ctx.structure, ctx.reverse
        g = g.contiguous()
        # The adjoint of a forward scan is a reverse scan with A_{t+1}^H, and vice versa.
        lam = scan_dispatch(A, g, None, st, reverse=not rev, adjoint=True, backend=ctx.backend)
        init = h0 if ctx.has_h0 else torch.zeros_like(h[:, 0])
        gA, gh0 = _transition_grads(ctx, A, h, init, lam)
        return gA, lam, gh0, None, None, None


class _SPLinearScanFn(torch.autograd.Function):
    """Sequence-parallel linear_scan: this rank's chunk; backward = the sequence-parallel adjoint."""

    @staticmethod
    def forward(ctx, A, b, h0, structure, reverse, backend, group):
        from .distributed import sp_scan

        h, h_in = sp_scan(A, b, h0, structure, reverse, group, backend)
        ctx.structure, ctx.reverse, ctx.backend, ctx.group = structure, reverse, backend, group
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(A, h, h_in)
        return h

    @staticmethod
    def backward(ctx, g):
        from .distributed import rank_and_size, sp_adjoint_scan

        A, h, h_in = ctx.saved_tensors
        st, rev = ctx.structure, ctx.reverse
        lam = sp_adjoint_scan(A, g.contiguous(), st, rev, ctx.group, ctx.backend)
        gA, gh0 = _transition_grads(ctx, A, h, h_in, lam)
        rank, W = rank_and_size(ctx.group)
        if gh0 is not None and rank != (W - 1 if rev else 0):  # h0 only enters the first chunk
            gh0 = torch.zeros_like(gh0)
        return gA, lam, gh0, None, None, None, None


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must be a floating or complex tensor, got dtype {t.dtype}")


def linear_scan(
    A: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    structure: Structure = "diagonal",
    reverse: bool = False,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Solve the linear recurrence ``h_t = A_t h_{t-1} + b_t`` for all t as one parallel reduction.

    Args:
        A: transitions. ``[B, T, d]`` for ``"diagonal"``, ``[B, T, d/k, k, k]`` for
            ``pararnn.Block(k)``, ``[B, T, d, d]`` for ``"dense"``. Complex dtypes are supported.
        b: inputs ``[B, T, d]``, same dtype and device as A.
        h0: initial state ``[B, d]`` (default zeros). With ``reverse=True`` it is ``h_{T+1}``.
        structure: ``"diagonal"``, ``pararnn.Block(k)`` or ``"dense"``.
        reverse: solve the reverse-time recurrence ``h_t = A_t h_{t+1} + b_t`` instead.
        backend: ``"auto"`` (Triton on CUDA, compiled numba on CPU, else the loop), ``"cpu"``,
            ``"triton"`` or ``"reference"`` (the plain PyTorch loop).
        process_group: a ``torch.distributed`` group for sequence parallelism: every rank passes
            its own consecutive time chunk (rank order = time order; chunk lengths may differ)
            and the same h0; the result is this rank's chunk. See :mod:`pararnn.distributed`.

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
    structure = normalize_structure(structure, d)
    want = (B, T, *jacobian_shape(structure, d))
    if tuple(A.shape) != want:
        raise ValueError(
            f"A must have shape {list(want)} for structure {structure!s} and b of shape "
            f"{list(b.shape)}, got {list(A.shape)}"
        )
    if A.dtype != b.dtype:
        raise TypeError(f"A and b must share a dtype, got A: {A.dtype}, b: {b.dtype}")
    if A.device != b.device:
        raise ValueError(f"A and b must be on one device, got A: {A.device}, b: {b.device}")
    if h0 is not None:
        _check_tensor("h0", h0)
        if tuple(h0.shape) != (B, d):
            raise ValueError(f"h0 must be [B, d] = {[B, d]}, got {list(h0.shape)}")
        if h0.dtype != b.dtype or h0.device != b.device:
            raise TypeError(
                f"h0 must match b's dtype and device ({b.dtype}, {b.device}), "
                f"got ({h0.dtype}, {h0.device})"
            )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if process_group is not None:
        return _SPLinearScanFn.apply(A, b, h0, structure, bool(reverse), backend, process_group)
    return _LinearScanFn.apply(A, b, h0, structure, bool(reverse), backend)
