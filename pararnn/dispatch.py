"""Scan dispatch: which backend solves ``h_t = A_t h_{t-1} + b_t`` for these tensors, and the call."""
from __future__ import annotations

import torch

from .kernels import cpu as _cpu
from .kernels.assoc import scan_assoc
from .kernels.reference import scan_reference
from .structure import Structure

BACKENDS = ("auto", "reference", "cpu", "triton", "assoc")


def triton_module():
    """``pararnn.kernels.triton_scan`` if triton is importable, else None."""
    try:
        from .kernels import triton_scan
    except ImportError:  # pragma: no cover - triton missing
        return None
    return triton_scan if triton_scan.HAVE_TRITON else None


def check_backend(backend) -> None:
    """Raise ValueError naming ``backend`` unless it is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, A: torch.Tensor, b: torch.Tensor, structure: Structure) -> str:
    """Pick the concrete backend for these tensors.

    ``"auto"``: Triton for CUDA tensors when a kernel exists for the structure and dtype, else
    the log-depth PyTorch scan (``"assoc"``: dense, shared blocks, k > 4, fp64 on CUDA); the
    compiled numba path for CPU tensors; the plain PyTorch loop otherwise.
    """
    check_backend(backend)
    if backend != "auto":
        if backend == "cpu" and not _cpu.HAVE_NUMBA:
            raise RuntimeError("backend='cpu' needs numba, which is not importable here")
        if backend == "triton" and triton_module() is None:
            raise RuntimeError("backend='triton' needs triton, which is not importable here")
        return backend
    if A.device != b.device:
        return "reference"
    return auto_backend(b.device, b.dtype, structure, b.shape[-1])


def auto_backend(device: torch.device, dtype: torch.dtype, structure: Structure, d: int) -> str:
    """The backend ``"auto"`` takes on this device for this structure, dtype and state size:
    ``"triton"`` (CUDA, where a kernel exists), ``"assoc"`` (CUDA otherwise: the log-depth scan in
    batched matmuls), ``"cpu"`` (numba) or ``"reference"`` (the PyTorch loop over T).
    :func:`pararnn.choose_mode` asks the same question."""
    if device.type == "cuda":
        tri = triton_module()
        return "triton" if tri is not None and tri.supports(structure, dtype, d) else "assoc"
    return "cpu" if device.type == "cpu" and _cpu.HAVE_NUMBA else "reference"


def scan(A, b, h0, structure: Structure, reverse=False, adjoint=False, backend="auto", out=None):
    """Unchecked fast entry (inputs already validated, structure an object). Returns ``[B, T, d]``.

    Semantics: :func:`pararnn.kernels.reference.scan_reference`.
    """
    name = resolve_backend(backend, A, b, structure)
    if name == "cpu":
        return _cpu.scan_cpu(A, b, h0, structure, reverse, adjoint, out=out)
    if name == "triton":
        return triton_module().scan_triton(A, b, h0, structure, reverse, adjoint, out=out)
    if name == "assoc":
        res = scan_assoc(A, b, h0, structure, reverse, adjoint)
        return res if out is None else out.copy_(res)
    res = scan_reference(A, b, h0, structure, reverse, adjoint)
    return res if out is None else out.copy_(res)


scan_dispatch = scan  # the name the benchmarks use

__all__ = ["BACKENDS", "auto_backend", "check_backend", "resolve_backend", "scan", "scan_dispatch"]
