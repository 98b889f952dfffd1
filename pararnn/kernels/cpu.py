"""Compiled CPU linear scans (numba): diagonal (real/complex) and k×k blocks, forward/reverse/adjoint.

Semantics are exactly those of :func:`pararnn.kernels.reference.scan_reference`; the tests compare
the two. Each independent lane (a batch row and a slice of the state) walks T sequentially: on a
CPU the scan is memory-bound, and a sequential walk reads A and b once and writes h once, which is
the memory floor. Lanes run in parallel with ``numba.prange``.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ..runtime import numba_threads
from ..structure import Diagonal, as_structure

try:  # numba is optional: without it the plain PyTorch loop serves
    import numba
    from numba import njit, prange

    HAVE_NUMBA = os.environ.get("PARARNN_DISABLE_NUMBA", "0") != "1"
    # numba's threading layer is the user's: pararnn.runtime.fork_safe_workers() picks a fork-safe
    # one for programs that fork after a solve
except ImportError:  # pragma: no cover - exercised only where numba is missing
    HAVE_NUMBA = False

_SUPPORTED = (torch.float32, torch.float64, torch.complex64, torch.complex128)

# The block kernel sums k products per state entry: in fp32 those k roundings at the size of the
# state made one linear scan 5× less accurate than the sequential loop (DeltaNet 64×64, T = 8192:
# 2.8e-6 against 5.3e-7 relative to fp64), so linear cells needed a second Newton step to refine
# it. Products are summed in fp64 (complex128) and rounded once per entry.
WIDE = 1.0

if HAVE_NUMBA:

    @njit(cache=True, parallel=True, nogil=True)
    def _diag_kernel(A, b, h0, has_h0, out, shift, base, has_base, reverse, adjoint, chunk):  # pragma: no cover
        # A, b: [B, T, d]; h0: [B, d]; out, base: [B, T', d], step t at row t + shift (T' >= T + shift).
        # A lane = (batch row, slice of `chunk` state entries), carried in a local buffer h so each
        # step reads A_t, b_t once and writes h_t once (base_t + h_t with has_base: not adjoint).
        B, T, d = b.shape
        nchunk = (d + chunk - 1) // chunk
        for lane in prange(B * nchunk):
            bi = lane // nchunk
            lo = (lane % nchunk) * chunk
            n = min(lo + chunk, d) - lo
            Ab = A[bi]
            bb = b[bi]
            ob = out[bi]
            hb = base[bi]
            h = np.zeros(n, dtype=out.dtype)
            if has_h0 and not adjoint:
                for i in range(n):
                    h[i] = h0[bi, lo + i]
            # One loop per step that computes, carries and stores each entry (v), and no branch on
            # the mode inside the walk over T: numba then vectorises it (B = 1, T = 4096, d = 64,
            # serial: 0.046 ms against 0.160 ms for a store loop re-reading h, bit-identical).
            if adjoint:  # λ_t = b_t + A_{t'}^H λ_{t'}, t' the neighbour already visited
                t = T - 1 if reverse else 0
                for i in range(n):
                    v = bb[t, lo + i]
                    h[i] = v
                    ob[t + shift, lo + i] = v
                for s in range(1, T):
                    t = T - 1 - s if reverse else s
                    tp = t + 1 if reverse else t - 1
                    At = Ab[tp, lo:lo + n]
                    bt = bb[t, lo:lo + n]
                    ot = ob[t + shift, lo:lo + n]
                    for i in range(n):
                        v = At[i].conjugate() * h[i] + bt[i]
                        h[i] = v
                        ot[i] = v
            elif has_base:  # out_t = base_t + h_t (may be base itself: each entry is read before written)
                for s in range(T):
                    t = T - 1 - s if reverse else s
                    At = Ab[t, lo:lo + n]
                    bt = bb[t, lo:lo + n]
                    ot = ob[t + shift, lo:lo + n]
                    ht = hb[t + shift, lo:lo + n]
                    for i in range(n):
                        v = At[i] * h[i] + bt[i]
                        h[i] = v
                        ot[i] = ht[i] + v
            else:
                for s in range(T):
                    t = T - 1 - s if reverse else s
                    At = Ab[t, lo:lo + n]
                    bt = bb[t, lo:lo + n]
                    ot = ob[t + shift, lo:lo + n]
                    for i in range(n):
                        v = At[i] * h[i] + bt[i]
                        h[i] = v
                        ot[i] = v

    @njit(cache=True, parallel=True, nogil=True)
    def _block_kernel(A, b, h0, has_h0, out, shift, base, has_base, reverse, adjoint, chunk):  # pragma: no cover
        # A: [B, T, m, k, k]; b: [B, T, m*k]; h0: [B, m*k]; out, base: [B, T', m*k], step t at row
        # t + shift (base_t + h_t with has_base: not adjoint). A lane = (batch row, `chunk` blocks).
        B, T, m, k, _ = A.shape
        nchunk = (m + chunk - 1) // chunk
        for lane in prange(B * nchunk):
            bi = lane // nchunk
            j0 = (lane % nchunk) * chunk
            nb = min(j0 + chunk, m) - j0
            lo = j0 * k
            n = nb * k
            h = np.zeros(n, dtype=out.dtype)
            hn = np.zeros(n, dtype=out.dtype)
            if has_h0 and not adjoint:
                for i in range(n):
                    h[i] = h0[bi, lo + i]
            for s in range(T):
                t = T - 1 - s if reverse else s
                bt = b[bi, t, lo:lo + n]
                if adjoint and s == 0:
                    for i in range(n):
                        hn[i] = bt[i]
                elif adjoint:
                    At = A[bi, t + 1 if reverse else t - 1]
                    for jj in range(nb):
                        Aj = At[j0 + jj]
                        for r in range(k):
                            acc = bt[jj * k + r] * WIDE  # fp64 (complex128) accumulator
                            for c in range(k):
                                acc += Aj[c, r].conjugate() * WIDE * h[jj * k + c]
                            hn[jj * k + r] = acc
                else:
                    At = A[bi, t]
                    for jj in range(nb):
                        Aj = At[j0 + jj]
                        for r in range(k):
                            acc = bt[jj * k + r] * WIDE
                            for c in range(k):
                                acc += Aj[r, c] * WIDE * h[jj * k + c]
                            hn[jj * k + r] = acc
                ot = out[bi, t + shift, lo:lo + n]
                if has_base:
                    ht = base[bi, t + shift, lo:lo + n]
                    for i in range(n):
                        h[i] = hn[i]
                        ot[i] = ht[i] + hn[i]
                else:
                    for i in range(n):
                        h[i] = hn[i]
                        ot[i] = hn[i]

    def _serial(kernel):
        """The same kernel compiled without ``parallel=True`` (prange runs as range), for scans with
        one lane or one numba thread: a parallel launch on numba's workqueue layer costs 0.11-0.12 ms
        even at one thread, against 2 µs serially, and a ParaGRU solve at B = 1, d = 64 (one lane at
        any thread count) runs 4-5 scans of 0.05-0.15 ms each. A function of its own name, so
        numba's on-disk cache (keyed by qualified name and bytecode, not by the flags) keeps the
        two apart."""
        import types

        fn = kernel.py_func
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                  fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        return njit(cache=True, nogil=True)(twin)

    _diag_kernel_serial = _serial(_diag_kernel)
    _block_kernel_serial = _serial(_block_kernel)


# State entries one lane walks at least: 64 fp32 = 256 B, four cache lines per row of A, b and h,
# so a lane's loads stay whole cache lines; narrower lanes only add scheduling overhead.
LANE_ELEMENTS = 64


def _lanes(rows: int, width: int, min_chunk: int) -> int:
    """Chunk size so that rows * (width / chunk) lanes keep every thread busy."""
    want = max(1, -(-2 * numba_threads() // max(rows, 1)))
    return max(min(min_chunk, width), -(-width // want))


def _kernel_for(parallel, serial, rows: int, width: int, chunk: int):
    """The kernel to launch for ``rows × ⌈width / chunk⌉`` lanes: the serial twin where there is one
    lane or one numba thread (see ``_serial``), else the parallel one."""
    return serial if rows * -(-width // chunk) == 1 or numba_threads() == 1 else parallel


def available(A: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the compiled path can take these tensors (CPU, supported dtype, numba present)."""
    return HAVE_NUMBA and b.device.type == "cpu" and A.device.type == "cpu"


def _np(t: torch.Tensor):
    return t.detach().resolve_conj().contiguous().numpy()


def _window(t: torch.Tensor):
    """``(P, shift)`` with ``t [B, T, d] == P[:, shift:shift + T]`` for a C-contiguous numpy array
    ``P [B, T', d]`` sharing t's memory (t itself, or the contiguous tensor t is a time slice of,
    as the solver's iterate ``S[:, 1:]`` is of ``S``), or None. numba's loops over a strided array
    do not vectorise (a fused scan and update, B = 8, T = 1024, d = 256: 1.31 ms strided against
    0.62 ms through the contiguous parent)."""
    if t.is_contiguous():
        return t.detach().numpy(), 0
    p = t._base
    if p is None or p.dim() != 3 or not p.is_contiguous() or p.shape[0] != t.shape[0] or p.shape[2] != t.shape[2]:
        return None
    step = p.shape[2]
    off = t.storage_offset() - p.storage_offset()
    if t.stride() != p.stride() or off % step or not 0 <= off // step <= p.shape[1] - t.shape[1]:
        return None
    return p.detach().numpy(), off // step


def scan_cpu(A, b, h0, structure, reverse=False, adjoint=False, out=None, base=None):
    """Compiled twin of :func:`scan_reference` (same arguments); writes into ``out`` if given.

    ``base [B, T, d]``: return ``base + h`` instead of h (forward scans only), in one pass: the
    solver's Newton update ``H + δ`` written straight into the next iterate (``out`` may be
    ``base`` itself). ``out`` and ``base`` may be time slices of contiguous ``[B, T', d]``
    tensors (:func:`_window`), written and read in place. fp16/bf16 inputs are computed in fp32
    and cast back.
    """
    dtype = b.dtype
    if base is not None and adjoint:
        raise ValueError("base (out = base + h) is for forward scans, not adjoint ones")
    if dtype not in _SUPPORTED:  # half precisions: accumulate in fp32
        work = torch.float32
        res = scan_cpu(A.to(work), b.to(work), None if h0 is None else h0.to(work), structure, reverse, adjoint)
        res = res.to(dtype) if base is None else base + res.to(dtype)
        return res if out is None else out.copy_(res)
    B, T, d = b.shape
    structure = as_structure(structure, d)
    win = None if out is None else _window(out)
    res = torch.empty((B, T, d), dtype=dtype) if win is None else out
    outn, shift = (res.numpy(), 0) if win is None else win
    if base is None:
        basen, has_base = outn, False  # never read
    else:
        bw = _window(base)
        if bw is None or bw[1] != shift:  # the kernel reads base_t and writes out_t at the same row
            bw = _np(base), 0
            if shift:  # so out moves to a plain buffer, copied into out at the end
                res = torch.empty((B, T, d), dtype=dtype)
                outn, shift = res.numpy(), 0
        basen, has_base = bw[0], True
    has_h0 = h0 is not None
    h0n = _np(h0) if has_h0 else _np(b.new_zeros(1, 1))
    if isinstance(structure, Diagonal):
        chunk = _lanes(B, d, LANE_ELEMENTS)
        kernel = _kernel_for(_diag_kernel, _diag_kernel_serial, B, d, chunk)
        kernel(_np(A), _np(b), h0n, has_h0, outn, shift, basen, has_base, reverse, adjoint, chunk)
    else:  # every other structure as [B, T, m, k, k] blocks (dense: one block; shared: a stride-0 view)
        An = structure.as_blocks(A.detach().resolve_conj().contiguous(), d).numpy()
        m, k = An.shape[2], An.shape[3]
        chunk = _lanes(B, m, max(1, LANE_ELEMENTS // k))
        kernel = _kernel_for(_block_kernel, _block_kernel_serial, B, m, chunk)
        kernel(An, _np(b), h0n, has_h0, outn, shift, basen, has_base, reverse, adjoint, chunk)
    if out is not None and res is not out:
        out.copy_(res)
        return out
    return res
