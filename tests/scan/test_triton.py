"""Triton kernels against the plain loop, under the interpreter when there is no GPU."""
import os

import pytest
import torch
from helpers import BlockTanh, DiagGRU, rel_err

import pararnn
from pararnn.kernels.reference import scan_reference
from pararnn.structure import Block, Diagonal, as_structure

triton_scan = pytest.importorskip("pararnn.kernels.triton_scan")
if not triton_scan.HAVE_TRITON:
    pytest.skip("triton not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must enable the interpreter"
    import triton_interp

    assert triton_interp.install(), "could not install the tree-order scan for the interpreter"


def make(structure, B, T, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = as_structure(structure, d)
    cdt = torch.complex128 if dtype.is_complex else torch.float64
    A = torch.randn(B, T, *st.storage_shape(d), generator=g, dtype=cdt)
    if isinstance(st, Diagonal):
        A = A / A.abs().clamp_min(1.0)
    else:
        A = A * (0.6 / st.storage_shape(d)[-1] ** 0.5)
    b = torch.randn(B, T, d, generator=g, dtype=cdt)
    h0 = torch.randn(B, d, generator=g, dtype=cdt)
    return A.to(dtype), b.to(dtype), h0.to(dtype)


TOL = {torch.float32: 1e-5, torch.complex64: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("T", [1, 7, 63, 200])
@pytest.mark.parametrize("structure, dtype", [
    ("diagonal", torch.float32), ("diagonal", torch.float16), ("diagonal", torch.complex64),
    (Block(2), torch.float32), (Block(2), torch.float16), (Block(3), torch.float32),
    (Block(4), torch.float32),
])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_matches_reference(T, structure, dtype, reverse):
    d = 12
    A, b, h0 = make(structure, 2, T, d, dtype)
    st = as_structure(structure, d)
    wide = torch.complex128 if dtype.is_complex else torch.float64
    for init in (None, h0):
        ref = scan_reference(A.to(wide), b.to(wide), None if init is None else init.to(wide), st, reverse)
        out = pararnn.linear_scan(A.to(DEVICE), b.to(DEVICE), None if init is None else init.to(DEVICE),
                                  structure, reverse=reverse, backend="triton")
        assert out.dtype == dtype
        assert rel_err(out.cpu(), ref) < TOL[dtype], (init is None)
        if reverse:  # and against a flip-based reference: reverse = flip ∘ forward ∘ flip
            flip = scan_reference(A.to(wide).flip(1), b.to(wide).flip(1),
                                  None if init is None else init.to(wide), st).flip(1)
            assert rel_err(out.cpu(), flip) < TOL[dtype]


@pytest.mark.parametrize("structure, dtype", [("diagonal", torch.float32), ("diagonal", torch.complex64),
                                              (Block(2), torch.float32), (Block(3), torch.float32)])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_adjoint_matches_flip_reference(structure, dtype, reverse):
    """The adjoint scan (shifted, transposed transitions) against an explicit flip-based loop."""
    d, T = 6, 37
    A, b, _ = make(structure, 2, T, d, dtype)
    st = as_structure(structure, d)
    wide = torch.complex128 if dtype.is_complex else torch.float64
    Aw, bw = A.to(wide), b.to(wide)
    AT = st.transpose(Aw)
    # forward adjoint: h_t = A_{t-1}^H h_{t-1} + b_t. Shift A by one and run the plain scan;
    # reverse adjoint: flip time, then the same.
    if reverse:
        AT, bw = AT.flip(1), bw.flip(1)
    shifted = torch.cat([torch.zeros_like(AT[:, :1]), AT[:, :-1]], 1)
    want = scan_reference(shifted, bw, None, st)
    if reverse:
        want = want.flip(1)
    got = triton_scan.scan_triton(A.to(DEVICE), b.to(DEVICE), None, st, reverse=reverse, adjoint=True)
    assert rel_err(got.cpu(), want) < 1e-5


@pytest.mark.parametrize("structure, dtype", [("diagonal", torch.float32), ("diagonal", torch.complex64),
                                              (Block(2), torch.float32)])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_through_triton_scan(structure, dtype, reverse):
    A, b, h0 = make(structure, 2, 29, 4, dtype)
    g = make(structure, 2, 29, 4, dtype, seed=1)[1]
    ghT = make(structure, 2, 29, 4, dtype, seed=2)[2]
    grads = {}
    for backend, dev in (("triton", DEVICE), ("reference", "cpu")):
        args = [t.detach().to(dev).requires_grad_() for t in (A, b, h0)]
        y = pararnn.linear_scan(*args, structure=structure, reverse=reverse, backend=backend)
        hT = y[:, 0] if reverse else y[:, -1]
        loss = (y * g.to(dev).conj()).real.sum() + (hT * ghT.to(dev).conj()).real.sum()
        grads[backend] = [x.cpu() for x in torch.autograd.grad(loss, args)]
    for a, r in zip(grads["triton"], grads["reference"]):
        assert rel_err(a, r) < 1e-4


def test_unsupported_combinations_are_clear():
    A, b, _ = make("dense", 1, 5, 6, torch.float32)
    with pytest.raises(NotImplementedError, match="no Triton kernel"):
        pararnn.linear_scan(A, b, structure="dense", backend="triton")
    A, b, _ = make("diagonal", 1, 5, 6, torch.float64)
    with pytest.raises(NotImplementedError, match="no Triton kernel"):
        pararnn.linear_scan(A, b, backend="triton")


@pytest.mark.parametrize("cell_fn, T", [(lambda: DiagGRU(3, 8), 100), (lambda: BlockTanh(3, 8, 2), 63)])
def test_newton_solve_with_triton_backend(cell_fn, T):
    cell = cell_fn().to(DEVICE)
    x = torch.randn(2, T, 3, device=DEVICE)
    rnn = pararnn.RNN(cell, backend="triton")
    x.requires_grad_()
    y, _, info = rnn(x, return_info=True)
    ys, _ = rnn(x, mode="sequential")
    assert info.all_converged
    assert rel_err(y, ys) < 1e-5
    gy = torch.randn_like(y)
    (gp,) = torch.autograd.grad((y * gy).sum(), [x])
    (gs,) = torch.autograd.grad((ys * gy).sum(), [x])
    assert rel_err(gp, gs) < 1e-4


def test_tree_scan_patch_is_active_and_tree_ordered():
    """The patch replaced the fold (so the kernels above were checked in tree order)."""
    if DEVICE != "cpu":
        pytest.skip("real GPU: no interpreter")
    from triton.runtime import interpreter

    assert getattr(interpreter.ScanOps.generic_scan, "_pararnn_tree", False)


@pytest.mark.parametrize("structure, dtype", [("diagonal", torch.float32), ("diagonal", torch.complex64),
                                              (Block(2), torch.float32), (Block(4), torch.float32)])
def test_overflowing_partial_products_give_no_nan(structure, dtype):
    """A = 100, b = 0: the tree's partial products of A overflow, the answer is exactly 0."""
    st = as_structure(structure, 8)
    A = torch.full((2, 64, *st.storage_shape(8)), 100.0, dtype=dtype)
    b = torch.zeros(2, 64, 8, dtype=dtype)
    b[1, 40] = 1.0  # the second row does overflow from t = 40 on, as in the reference
    ref = scan_reference(A.to(torch.complex128 if dtype.is_complex else torch.float64),
                         b.to(torch.complex128 if dtype.is_complex else torch.float64), None, st).to(dtype)
    A, b = A.requires_grad_(), b.requires_grad_()
    got = triton_scan.scan_triton(A.detach().to(DEVICE), b.detach().to(DEVICE), None, st).cpu()
    assert not bool(torch.isnan(got[0]).any()) and bool((got[0] == 0).all())
    finite = torch.isfinite(ref)
    assert bool((torch.isfinite(got) == finite).all())  # inf exactly where the reference overflows
    assert not bool(torch.isnan(got).any())
    g = torch.zeros(2, 64, 8, dtype=dtype)
    g[0, -1] = 1.0
    lam = triton_scan.scan_triton(A.detach().to(DEVICE), g.to(DEVICE), None, st, reverse=True, adjoint=True).cpu()
    assert not bool(torch.isnan(lam).any())
