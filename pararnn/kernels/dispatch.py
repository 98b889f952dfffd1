"""Scan dispatch: which backend solves ``h_t = A_t h_{t-1} + b_t`` for these tensors, and the call."""
from __future__ import annotations

import functools

import torch

from ..structure import Structure
from . import cpu as _cpu
from .assoc import scan_assoc
from .reference import scan_reference
from .tsplit import split_scan

BACKENDS = ("auto", "reference", "cpu", "triton", "assoc")


def triton_module():
    """``pararnn.kernels.triton_scan`` if triton is importable, else None."""
    try:
        from . import triton_scan
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


def scan(A, b, h0, structure: Structure, reverse=False, adjoint=False, backend="auto", out=None, base=None):
    """Unchecked fast entry (inputs already validated, structure an object). Returns ``[B, T, d]``.

    Semantics: :func:`pararnn.kernels.reference.scan_reference`. ``base [B, T, d]`` (forward scans):
    returns ``base + h`` instead, into ``out`` if given (which may be ``base`` itself); the CPU
    kernels add it as they store h (one pass, no h buffer), the others afterwards.
    """
    name = resolve_backend(backend, A, b, structure)
    if name == "cpu":
        return _cpu.scan_cpu(A, b, h0, structure, reverse, adjoint, out=out, base=base)
    if base is not None:
        if adjoint:
            raise ValueError("base (out = base + h) is for forward scans, not adjoint ones")
        h = scan(A, b, h0, structure, reverse, adjoint, backend=name)
        return torch.add(base, h, out=out) if out is not None else base + h
    if name == "triton":
        tri = triton_module()
        pieces = time_pieces(b.shape[0], b.shape[1], b.shape[-1], b.device,
                             lanes=tri.lanes_per_program(structure, b.shape[-1]))
        if pieces == 1:
            return tri.scan_triton(A, b, h0, structure, reverse, adjoint, out=out)
        # few rows for the device: split T across programs too (three passes)
        res = split_scan(tri.scan_triton, A, b, h0, structure, pieces, reverse, adjoint)
    elif name == "assoc":
        res = scan_assoc(A, b, h0, structure, reverse, adjoint)
    else:
        res = scan_reference(A, b, h0, structure, reverse, adjoint)
    return res if out is None else out.copy_(res)


def time_pieces(B: int, T: int, d: int, device: torch.device, lanes: int = 32) -> int:
    """How many pieces to split T into for a Triton scan (1: no split). One program walks all of T
    for a batch row and a tile of ``lanes`` state entries (the kernel's widest autotune tile:
    :func:`pararnn.kernels.triton_scan.lanes_per_program`), so with ``B·⌈d/lanes⌉`` programs below
    the SM count most of a GPU idles: split long sequences (T ≥ 2048) into pieces of at least 512
    steps until there are about two programs per SM. A first rule, not yet calibrated on a GPU
    (benchmarks/device_check.py times split against unsplit scans)."""
    if device.type != "cuda" or T < 2048:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    rows = B * -(-d // lanes)
    if rows >= sms:
        return 1
    return max(1, min(T // 512, (2 * sms) // rows))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (asked once: scans run in Newton's loop)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


scan_dispatch = scan  # the name the benchmarks use

__all__ = ["BACKENDS", "auto_backend", "check_backend", "resolve_backend", "scan", "scan_dispatch", "time_pieces"]
