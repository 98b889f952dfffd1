"""Triton linear scans: diagonal (real, complex) and k×k blocks (k = 2, 3, 4), forward/reverse/adjoint.

One program owns one batch row and a tile of independent lanes (state entries or blocks) and
walks T in tiles of BLOCK_T: inside a tile, ``tl.associative_scan`` composes the affine maps
``h -> A h + b`` in O(log BLOCK_T) depth; across tiles it carries the state (the composed map
applied to the carry). All arithmetic is fp32 whatever the storage dtype. Reverse time and the
adjoint's shifted, transposed transitions are done by addressing (no flipped copies, no
``reverse=True`` scans). Semantics equal :func:`pararnn.kernels.reference.scan_reference`.
"""
from __future__ import annotations

import contextlib

import os

import torch

from ..structure import Diagonal, as_structure

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - no triton (e.g. macOS): CPU paths still work
    HAVE_TRITON = False


def interpreting() -> bool:
    """Triton's CPU interpreter is on (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAVE_TRITON:
    from .triton_blocks import KERNELS as _BLOCK_KERNELS
    from .triton_common import lane_tile, mul0, time_index

    @triton.jit
    def _combine_real(a1, b1, a2, b2):
        return mul0(a2, a1), mul0(a2, b1) + b2

    @triton.jit
    def _combine_complex(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
        # (a2, b2) ∘ (a1, b1) = (a2 a1, a2 b1 + b2) in complex arithmetic
        return (mul0(ar2, ar1) - mul0(ai2, ai1), mul0(ar2, ai1) + mul0(ai2, ar1),
                mul0(ar2, br1) - mul0(ai2, bi1) + br2, mul0(ar2, bi1) + mul0(ai2, br1) + bi2)

    @triton.jit(do_not_specialize=["T"])
    def _diag_real_kernel(A, Bv, H0, OUT, T, D, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                          ADJOINT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # A, Bv, OUT: [B, T, D]; H0: [B, D]. One program = (batch row, BLOCK_D channels).
        bi, offs_d, mask_d = lane_tile(D, BLOCK_D)
        rows = tl.arange(0, BLOCK_T)
        base = bi * tl.cast(T, tl.int64) * D
        if HAS_H0:
            carry = tl.load(H0 + bi * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t, ta, valid, va = time_index(t0, rows, T, REVERSE, ADJOINT)
            m2 = valid[:, None] & mask_d[None, :]
            # masked entries are the identity map (a = 1, b = 0)
            a = tl.load(A + base + ta[:, None] * D + offs_d[None, :], mask=va[:, None] & mask_d[None, :],
                        other=1.0).to(tl.float32)
            b = tl.load(Bv + base + t[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
            acum, bcum = tl.associative_scan((a, b), axis=0, combine_fn=_combine_real)
            h = mul0(acum, carry[None, :]) + bcum
            tl.store(OUT + base + t[:, None] * D + offs_d[None, :], h.to(OUT.dtype.element_ty), mask=m2)
            carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, h, 0.0), axis=0)

    @triton.jit(do_not_specialize=["T"])
    def _diag_complex_kernel(A, Bv, H0, OUT, T, D, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                             ADJOINT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # Interleaved (re, im) storage: A, Bv, OUT: [B, T, D, 2]; H0: [B, D, 2].
        bi, offs_d, mask_d = lane_tile(D, BLOCK_D)
        rows = tl.arange(0, BLOCK_T)
        base = bi * tl.cast(T, tl.int64) * D * 2
        if HAS_H0:
            cr = tl.load(H0 + (bi * D + offs_d) * 2, mask=mask_d, other=0.0).to(tl.float32)
            ci = tl.load(H0 + (bi * D + offs_d) * 2 + 1, mask=mask_d, other=0.0).to(tl.float32)
        else:
            cr = tl.zeros([BLOCK_D], dtype=tl.float32)
            ci = tl.zeros([BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t, ta, valid, va = time_index(t0, rows, T, REVERSE, ADJOINT)
            m2 = valid[:, None] & mask_d[None, :]
            ma = va[:, None] & mask_d[None, :]
            pa = A + base + (ta[:, None] * D + offs_d[None, :]) * 2
            pb = base + (t[:, None] * D + offs_d[None, :]) * 2
            ar = tl.load(pa, mask=ma, other=1.0).to(tl.float32)
            ai = tl.load(pa + 1, mask=ma, other=0.0).to(tl.float32)
            if ADJOINT:  # conjugate transition
                ai = -ai
            br = tl.load(Bv + pb, mask=m2, other=0.0).to(tl.float32)
            bim = tl.load(Bv + pb + 1, mask=m2, other=0.0).to(tl.float32)
            ar, ai, br, bim = tl.associative_scan((ar, ai, br, bim), axis=0, combine_fn=_combine_complex)
            hr = mul0(ar, cr[None, :]) - mul0(ai, ci[None, :]) + br
            hi = mul0(ar, ci[None, :]) + mul0(ai, cr[None, :]) + bim
            tl.store(OUT + pb, hr.to(OUT.dtype.element_ty), mask=m2)
            tl.store(OUT + pb + 1, hi.to(OUT.dtype.element_ty), mask=m2)
            last = rows[:, None] == BLOCK_T - 1
            cr = tl.sum(tl.where(last, hr, 0.0), axis=0)
            ci = tl.sum(tl.where(last, hi, 0.0), axis=0)


_REAL = (torch.float32, torch.float16, torch.bfloat16)
_COMPLEX = (torch.complex64,)
_BLOCK_SIZES = (2, 3, 4)  # generated by gen_triton_blocks.py


def supports(structure, dtype: torch.dtype, d: int) -> bool:
    """Whether a Triton kernel exists for this structure and dtype (else use another backend).

    fp64 is not supported: the kernels accumulate in fp32, which would silently lose precision.
    """
    if isinstance(structure, Diagonal):
        return dtype in _REAL or dtype in _COMPLEX
    return dtype in _REAL and not structure.shared and structure.width(d) in _BLOCK_SIZES


# (BLOCK_T, lanes per program, num_warps): the grid first tried on GPUs. Compiled for sm_80 and
# sm_90 with no GPU (python -m pararnn.kernels.aot), much of it spilled registers: fp32 block3 on
# sm_80 in 15 of its 18 configs (every 2-warp one), block4's first config in every dtype.
FULL_GRID = [(bt, bl, w) for bt in (32, 64, 128) for bl in (16, 32, 64) for w in (2, 4)]
# The autotune space actually used: configs that compiled with no spill, no stack and shared
# memory within sm_80/sm_86/sm_90 limits for fp32 on both sm_80 and sm_90 (triton 3.9.0,
# ptxas 13.4), at most 4 per kernel, preferring fewer registers. Resources per config:
# pararnn/kernels/README.md. tests/scan/test_aot.py recompiles the first of each in CI.
GPU_CONFIGS: dict[str, list[tuple[int, int, int]]] = {
    "diag_real": [(32, 32, 4), (64, 16, 4), (128, 16, 4)],  # (64, 32, 4) spilled 4 B in fp16/bf16, sm_90
    "diag_complex": [(32, 16, 4), (32, 32, 4), (64, 16, 4)],
    "block2": [(32, 16, 4), (32, 32, 4), (64, 16, 4)],
    "block3": [(32, 8, 4), (64, 8, 4), (32, 16, 8), (32, 16, 4)],
    # triton 3.6.0 (torch 2.11's pin) spills 4 B on sm_80 in fp32/bf16 with (16, 8, 4) and (32, 8, 8)
    "block4": [(32, 8, 4), (16, 16, 4)],
}


def gpu_configs(name: str) -> list[tuple[int, int, int]]:
    """The autotune space of kernel ``name`` on a GPU (``python -m pararnn.kernels.aot`` checks it)."""
    return GPU_CONFIGS.get(name, FULL_GRID)


def lanes_per_program(structure, d: int) -> int:
    """State entries one program of the kernel for ``structure`` covers with its widest autotune
    tile (diagonal: BLOCK_D lanes; k×k blocks: BLOCK_M blocks of k entries), for the T-split rule."""
    if isinstance(structure, Diagonal):
        return max(bl for _, bl, _ in GPU_CONFIGS["diag_real"])
    k = structure.width(d)
    return k * max(bl for _, bl, _ in gpu_configs(f"block{k}"))


def _autotuned(kernel, lane_block: str, key: str, name: str):
    """Autotune over tile sizes keyed on the feature size only (never on T, which varies).

    The interpreter gets a single config: autotuning would benchmark every config there.
    """
    if interpreting():
        configs = [triton.Config({"BLOCK_T": 32, lane_block: 16})]
    else:  # pragma: no cover - needs a GPU
        configs = [triton.Config({"BLOCK_T": bt, lane_block: bl}, num_warps=w) for bt, bl, w in gpu_configs(name)]
        if os.environ.get("PARARNN_TRITON_CONFIGS") == "first":  # one compile per variant (device checks)
            configs = configs[:1]
    return triton.autotune(configs=configs, key=[key])(kernel)


if HAVE_TRITON:
    _diag_real = _autotuned(_diag_real_kernel, "BLOCK_D", "D", "diag_real")
    _diag_complex = _autotuned(_diag_complex_kernel, "BLOCK_D", "D", "diag_complex")
    _blocks = {k: _autotuned(kern, "BLOCK_M", "M", f"block{k}") for k, kern in _BLOCK_KERNELS.items()}


def scan_triton(A, b, h0, structure, reverse=False, adjoint=False, out=None):
    """Triton twin of :func:`scan_reference` (same arguments); writes into ``out`` if given."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not importable here")
    B, T, d = b.shape
    structure = as_structure(structure, d)
    if not supports(structure, b.dtype, d):
        raise NotImplementedError(
            f"no Triton kernel for structure {structure!s} with dtype {b.dtype} "
            f"(supported: diagonal fp32/fp16/bf16/complex64, blocks k<=4 fp32/fp16/bf16); "
            f"use backend='reference' or 'cpu'"
        )
    if b.device.type != "cuda" and not interpreting():
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for testing)")
    if adjoint and h0 is not None:
        raise ValueError("adjoint scans start from b; h0 must be None")
    # materialised: a lazily conjugated tensor (Diagonal.transpose of a complex A) cannot be viewed as real
    A, b = A.resolve_conj().contiguous(), b.resolve_conj().contiguous()
    res = out if out is not None and out.is_contiguous() else torch.empty_like(b)
    h0c = h0.resolve_conj().contiguous() if h0 is not None else b  # dummy pointer when HAS_H0 is False
    flags = dict(HAS_H0=h0 is not None, REVERSE=bool(reverse), ADJOINT=bool(adjoint))
    # launches go to the tensors' device, not the current one (tensors on cuda:1)
    with torch.cuda.device(b.device) if b.device.type == "cuda" else contextlib.nullcontext():
        if isinstance(structure, Diagonal):
            grid = lambda meta: (B * triton.cdiv(d, meta["BLOCK_D"]),)  # noqa: E731
            if b.is_complex():
                _diag_complex[grid](torch.view_as_real(A), torch.view_as_real(b), torch.view_as_real(h0c),
                                    torch.view_as_real(res), T, d, **flags)
            else:
                _diag_real[grid](A, b, h0c, res, T, d, **flags)
        else:
            Ab = structure.as_blocks(A, d)  # [B, T, M, k, k]
            M, k = Ab.shape[2], Ab.shape[3]
            grid = lambda meta: (B * triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
            _blocks[k][grid](Ab, b, h0c, res, T, M, **flags)
    if out is not None and res is not out:
        out.copy_(res)
        return out
    return res
