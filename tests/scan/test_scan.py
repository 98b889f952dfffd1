"""linear_scan: every backend against the plain loop, gradients against autograd of the loop."""
import pytest
import torch

import pararnn
from pararnn.kernels.reference import scan_reference
from pararnn.structure import Block, Diagonal, as_structure
from helpers import rel_err

STRUCTS = ["diagonal", Block(2), Block(3), Block(3, shared=True), "dense"]
DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]


# Triton tests run on CUDA where there is one; elsewhere under the interpreter (tests/conftest.py)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(structure, B, T, d, dtype, scale=0.6):
    structure = as_structure(structure, d)
    A = torch.randn(B, T, *structure.storage_shape(d), dtype=dtype)
    if isinstance(structure, Diagonal):
        A = A / A.abs().clamp_min(1.0)  # |a| <= 1
    else:
        A = A * (scale / structure.storage_shape(d)[-1] ** 0.5)
    b = torch.randn(B, T, d, dtype=dtype)
    h0 = torch.randn(B, d, dtype=dtype)
    return A, b, h0


def tol(dtype):
    return 1e-12 if dtype in (torch.float64, torch.complex128) else 2e-5


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 7, 200])
def test_cpu_backend_matches_reference(structure, dtype, reverse, T):
    A, b, h0 = make(structure, 3, T, 6, dtype)
    for init in (None, h0):
        ref = scan_reference(A, b, init, as_structure(structure, 6), reverse)
        out = pararnn.linear_scan(A, b, init, structure, reverse=reverse, backend="cpu")
        assert out.shape == ref.shape and out.dtype == dtype
        assert rel_err(out, ref) < tol(dtype)


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 2, 7, 200])
def test_assoc_backend_matches_reference(structure, dtype, reverse, T):
    """The log-depth PyTorch scan (the CUDA path where Triton has no kernel): forward, reverse and
    adjoint, with and without h0, odd and power-of-two T."""
    from pararnn.kernels.dispatch import scan

    A, b, h0 = make(structure, 3, T, 6, dtype)
    st = as_structure(structure, 6)
    for init in (None, h0):
        ref = scan_reference(A, b, init, st, reverse)
        assert rel_err(pararnn.linear_scan(A, b, init, structure, reverse=reverse, backend="assoc"), ref) < tol(dtype)
    adj = scan(A, b, None, st, reverse=reverse, adjoint=True, backend="assoc")
    assert rel_err(adj, scan_reference(A, b, None, st, reverse, adjoint=True)) < tol(dtype)


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("reverse", [False, True])
def test_reference_matches_explicit_loop(structure, reverse):
    """The reference itself against the recurrence written out with dense matrices."""
    A, b, h0 = make(structure, 2, 9, 6, torch.float64)
    st = as_structure(structure, 6)
    Ad = st.to_dense(A, 6)
    h = h0
    want = torch.empty_like(b)
    for t in (range(8, -1, -1) if reverse else range(9)):
        h = (Ad[:, t] @ h.unsqueeze(-1)).squeeze(-1) + b[:, t]
        want[:, t] = h
    assert rel_err(pararnn.linear_scan(A, b, h0, structure, reverse=reverse, backend="reference"), want) < 1e-13


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference", "assoc"])
def test_gradients_match_autograd_of_loop(structure, dtype, reverse, backend):
    A, b, h0 = make(structure, 2, 11, 6, dtype)
    st = as_structure(structure, 6)
    for t in (A, b, h0):
        t.requires_grad_()
    g = torch.randn_like(b)
    out = pararnn.linear_scan(A, b, h0, structure, reverse=reverse, backend=backend)
    loss = (out * g.conj()).real.sum()
    got = torch.autograd.grad(loss, [A, b, h0])
    ref = scan_reference(A, b, h0, st, reverse)
    want = torch.autograd.grad((ref * g.conj()).real.sum(), [A, b, h0])
    for x, y in zip(got, want):
        assert rel_err(x, y) < 1e-12


@pytest.mark.parametrize("backend", ["cpu", "reference", "assoc"])
def test_output_is_a_tensor_of_its_own(backend):
    """Not a view (the reference's stack was one, inside the custom op, so ``h += 1`` raised
    torch's "view created inside a custom Function"): modified in place, the backward, which
    needs h, raises autograd's in-place error, as for any op that saves its output."""
    A, b, h0 = (t.requires_grad_() for t in make("diagonal", 2, 11, 6, torch.float64))
    out = pararnn.linear_scan(A, b, h0, backend=backend)
    assert out._base is None
    out += 1
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


@pytest.mark.parametrize("structure", ["diagonal", Block(2), Block(2, shared=True), "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_gradcheck(structure, dtype):
    A, b, h0 = make(structure, 2, 5, 4, dtype)
    args = tuple(t.requires_grad_() for t in (A, b, h0))
    assert torch.autograd.gradcheck(lambda A, b, h0: pararnn.linear_scan(A, b, h0, structure), args)
    assert torch.autograd.gradcheck(
        lambda A, b, h0: pararnn.linear_scan(A, b, h0, structure, reverse=True), args)


def test_half_precision_accumulates_in_fp32():
    A, b, h0 = make("diagonal", 2, 300, 8, torch.float32)
    ref = scan_reference(A.double(), b.double(), h0.double(), "diagonal")
    out = pararnn.linear_scan(A.half(), b.half(), h0.half(), backend="cpu")
    assert out.dtype == torch.float16
    assert rel_err(out.double(), ref) < 5e-3


def test_noncontiguous_and_expanded_inputs():
    A, b, h0 = make("diagonal", 3, 20, 5, torch.float64)
    At = A.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    b_exp = b[:1].expand(3, 20, 5)
    ref = scan_reference(A, b_exp.contiguous(), h0, "diagonal")
    assert rel_err(pararnn.linear_scan(At, b_exp, h0, backend="cpu"), ref) < 1e-13


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(A=torch.rand(2, 5, 4), b=torch.rand(2, 5)), ValueError, "b must be"),
        (dict(A=torch.rand(2, 5, 3), b=torch.rand(2, 5, 4)), ValueError, "A must have shape"),
        (dict(A=torch.rand(2, 5, 4), b=torch.rand(2, 5, 4), structure=Block(3)), ValueError, "does not divide"),
        (dict(A=torch.rand(2, 5, 4), b=torch.rand(2, 5, 4), structure="sparse"), ValueError, "structure"),
        (dict(A=torch.rand(2, 5, 4).double(), b=torch.rand(2, 5, 4)), TypeError, "share a dtype"),
        (dict(A=torch.rand(2, 0, 4), b=torch.rand(2, 0, 4)), ValueError, "T = 0"),
        (dict(A=torch.rand(2, 5, 4), b=torch.rand(2, 5, 4), h0=torch.rand(2, 3)), ValueError, "h0 must be"),
        (dict(A=torch.rand(2, 5, 4), b=torch.rand(2, 5, 4), h0=torch.rand(2, 4).double()), TypeError, "h0 must match"),
        (dict(A=torch.rand(2, 5, 4), b=torch.rand(2, 5, 4), backend="cuda"), ValueError, "backend"),
        (dict(A=torch.ones(2, 5, 4, dtype=torch.int64), b=torch.rand(2, 5, 4)), TypeError, "A must be a floating"),
        (dict(A=torch.rand(2, 5, 4), b=torch.rand(2, 5, 4, device="meta")), ValueError, "one device"),
        (dict(A=[[1.0]], b=torch.rand(2, 5, 4)), TypeError, "A must be a torch.Tensor"),
    ],
)
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        pararnn.linear_scan(**kwargs)


def test_T_equals_one():
    A, b, h0 = make(Block(2), 2, 1, 4, torch.float64)
    out = pararnn.linear_scan(A, b, h0, Block(2))
    want = (A[:, 0] @ h0.reshape(2, 2, 2, 1)).reshape(2, 4) + b[:, 0]
    assert rel_err(out[:, 0], want) < 1e-14


@pytest.mark.parametrize("structure", STRUCTS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("T, pieces", [(1, 4), (7, 3), (200, 7), (64, 8)])
def test_time_split_scan_equals_one_scan(structure, reverse, adjoint, T, pieces):
    """T split across rows (three passes of any kernel; here numba) equals one scan: odd T, a
    padded last piece, more pieces than steps, every structure, reverse and adjoint."""
    from pararnn.kernels.cpu import scan_cpu
    from pararnn.kernels.tsplit import split_scan

    A, b, h0 = make(structure, 3, T, 6, torch.complex128 if structure == "diagonal" else torch.float64)
    st = as_structure(structure, 6)
    for init in ((None,) if adjoint else (None, h0)):
        want = scan_reference(A, b, init, st, reverse, adjoint)
        assert rel_err(split_scan(scan_cpu, A, b, init, st, pieces, reverse, adjoint), want) < 1e-11


@pytest.mark.parametrize("structure", ["diagonal", Block(2)])
def test_time_split_with_the_triton_kernels(structure):
    """The same three passes with the Triton kernels (interpreter), at odd T."""
    pytest.importorskip("triton")
    from pararnn.kernels.triton_scan import scan_triton
    from pararnn.kernels.tsplit import split_scan

    A, b, h0 = (t.to(TRITON_DEVICE) for t in make(structure, 2, 37, 4, torch.float32))
    st = as_structure(structure, 4)
    for reverse in ((False, True) if structure == "diagonal" else (False,)):  # blocks: slow to interpret
        want = scan_reference(A, b, h0, st, reverse)
        got = split_scan(scan_triton, A, b, h0, st, 4, reverse)
        assert got.is_contiguous()  # T = 37 pads the last piece: the cut must not be a strided view
        assert rel_err(got, want) < 1e-5
    assert pararnn.kernels.dispatch.time_pieces(1, 16384, 64, torch.device("cpu")) == 1  # CPU: never split


def test_time_split_complex_adjoint_with_the_triton_kernels():
    """The backward of a complex reverse scan through the split: Diagonal.transpose conjugates
    lazily, and at a T the pieces divide (no padding) the conj bit reached the kernel wrapper."""
    pytest.importorskip("triton")
    from pararnn.kernels.triton_scan import scan_triton
    from pararnn.kernels.tsplit import split_scan

    A, b, _ = (t.to(TRITON_DEVICE) for t in make("diagonal", 2, 36, 4, torch.complex64))
    st = as_structure("diagonal", 4)
    for reverse in (False, True):
        want = scan_reference(A, b, None, st, reverse, adjoint=True)
        assert rel_err(split_scan(scan_triton, A, b, None, st, 4, reverse, adjoint=True), want) < 1e-5


def test_time_split_under_torch_compile(monkeypatch):
    """The split's result under torch.compile: the custom op's fake promises a contiguous
    [B, T, d], which a strided cut of the padded pieces broke (inductor asserted on the stride)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(pararnn.kernels.dispatch, "time_pieces", lambda B, T, d, device, lanes=32: 4)
    A, b, h0 = (t.to(TRITON_DEVICE) for t in make("diagonal", 3, 37, 4, torch.float32))
    want = scan_reference(A, b, h0, as_structure("diagonal", 4))
    f = torch.compile(lambda A, b, h0: pararnn.linear_scan(A, b, h0, backend="triton") * 2, backend="inductor")
    assert rel_err(f(A, b, h0), 2 * want) < 1e-5


@pytest.mark.parametrize("adjoint", [False, True])
def test_cpu_block_scan_sums_in_fp64(adjoint):
    """Each fp32 entry of the numba block scan is its k products summed in fp64 and rounded once:
    one step (T = 1 forward, T = 2 adjoint) equals the fp64 matvec rounded to fp32 at almost every
    entry, and is never more than 1 ulp off (summed in fp32, 64 terms give several ulp)."""
    from pararnn.kernels.cpu import HAVE_NUMBA, scan_cpu

    if not HAVE_NUMBA:
        pytest.skip("numba missing")
    g = torch.Generator().manual_seed(0)
    k, B = 64, 64
    A = torch.randn(B, 2, 1, k, k, generator=g).mul_(0.3)  # one dense block, [B, T, 1, k, k]
    A.diagonal(dim1=-2, dim2=-1).add_(1)
    h = torch.randn(B, k, generator=g)
    b = torch.randn(B, 2, k, generator=g).mul_(1e-3)
    A2 = A.reshape(B, 2, k, k)
    if adjoint:  # out_0 = b_0, out_1... reverse adjoint: out_{T-1} = b_{T-1}, out_0 = b_0 + A_1^T out_1
        bb = torch.stack([b[:, 0], h], 1)
        out = scan_cpu(A2, bb, None, "dense", reverse=True, adjoint=True)[:, 0]
        exact = (A2[:, 1].double().transpose(-1, -2) @ h.double()[..., None])[..., 0] + b[:, 0].double()
    else:
        out = scan_cpu(A2[:, :1], b[:, :1], h, "dense")[:, 0]
        exact = (A2[:, 0].double() @ h.double()[..., None])[..., 0] + b[:, 0].double()
    ulp = (out.double() - exact.float().double()).abs() / torch.finfo(torch.float32).eps / exact.abs().clamp_min(1e-30)
    assert float((out == exact.float()).double().mean()) > 0.99
    assert float(ulp.max()) <= 2.0


@pytest.mark.parametrize("structure", ["diagonal", Block(2), "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
def test_cpu_serial_and_parallel_kernels_agree(structure, dtype):
    """The numba kernels' serial twins (one lane or one thread) give the same bits as the parallel
    ones, forward, reverse and adjoint, with and without h0, several lanes per row included."""
    from pararnn.kernels import cpu

    if not cpu.HAVE_NUMBA:
        pytest.skip("numba missing")
    st = as_structure(structure, 6)
    A, b, h0 = make(st, 3, 33, 6, dtype)
    diag = isinstance(st, Diagonal)
    An = (A if diag else st.as_blocks(A.contiguous(), 6)).numpy()
    pairs = (cpu._diag_kernel, cpu._diag_kernel_serial) if diag else (cpu._block_kernel, cpu._block_kernel_serial)
    for reverse in (False, True):
        for adjoint in (False, True):
            for has_h0 in (False, True):
                outs = []
                for kernel in pairs:
                    out = torch.empty_like(b)
                    kernel(An, b.numpy(), h0.numpy(), has_h0, out.numpy(), 0, out.numpy(), False, reverse, adjoint,
                           2 if diag else 1)
                    outs.append(out)
                assert torch.equal(outs[0], outs[1])
                want = scan_reference(A, b, h0 if has_h0 and not adjoint else None, st, reverse, adjoint)
                assert rel_err(outs[1], want) < tol(dtype)


@pytest.mark.parametrize("structure", ["diagonal", Block(2), "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
def test_cpu_scan_adds_base_as_it_stores(structure, dtype):
    """``scan_cpu(..., base=H)`` is ``H + scan`` bit for bit (the Newton update applied in the scan's
    pass), into a time slice of a contiguous buffer (the solver's ``S[:, 1:]``), in place, and from
    a base in another layout; forward and reverse, with and without h0."""
    from pararnn.kernels import cpu

    if not cpu.HAVE_NUMBA:
        pytest.skip("numba missing")
    st = as_structure(structure, 6)
    A, b, h0 = make(st, 3, 33, 6, dtype)
    g = torch.Generator().manual_seed(5)
    S = torch.randn(3, 34, 6, generator=g).to(dtype)  # [B, T+1, d]: S[:, 1:] is the iterate
    for reverse in (False, True):
        for init in (None, h0):
            plain = cpu.scan_cpu(A, b, init, st, reverse)
            want = S[:, 1:] + plain
            assert torch.equal(cpu.scan_cpu(A, b, init, st, reverse, base=S[:, 1:]), want)
            out = torch.zeros_like(S)
            cpu.scan_cpu(A, b, init, st, reverse, out=out[:, 1:], base=S[:, 1:])
            assert torch.equal(out[:, 1:], want) and bool((out[:, 0] == 0).all())  # row 0 untouched
            inplace = S.clone()
            cpu.scan_cpu(A, b, init, st, reverse, out=inplace[:, 1:], base=inplace[:, 1:])
            assert torch.equal(inplace[:, 1:], want) and torch.equal(inplace[:, 0], S[:, 0])
            other = S[:, 1:].contiguous()  # base at shift 0, out at shift 1: out goes through a buffer
            out.zero_()
            cpu.scan_cpu(A, b, init, st, reverse, out=out[:, 1:], base=other)
            assert torch.equal(out[:, 1:], want) and bool((out[:, 0] == 0).all())
            strided = S.transpose(0, 1).contiguous().transpose(0, 1)[:, 1:]  # no contiguous parent: copied
            assert torch.equal(cpu.scan_cpu(A, b, init, st, reverse, out=torch.empty_like(plain), base=strided), want)
    with pytest.raises(ValueError, match="forward scans"):
        cpu.scan_cpu(A, b, None, st, adjoint=True, base=S[:, 1:])


@pytest.mark.parametrize("backend", ["reference", "assoc", "cpu"])
def test_dispatch_scan_with_base_matches_across_backends(backend):
    """Every backend's ``base + h`` is the reference scan plus base."""
    from pararnn.kernels.dispatch import scan as scan_fast

    st = as_structure("diagonal", 5)
    A, b, h0 = make(st, 2, 17, 5, torch.float64)
    base = torch.randn(2, 17, 5, dtype=torch.float64)
    want = base + scan_reference(A, b, h0, st)
    out = torch.empty_like(base)
    got = scan_fast(A, b, h0, st, backend=backend, out=out, base=base)
    assert got is out
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scan_fast(A, b, h0, st, backend=backend, base=base), want, rtol=1e-12, atol=1e-12)


def test_time_split_rule_counts_programs_by_the_kernels_tiles(monkeypatch):
    """Programs are B·⌈d/lanes⌉ with the kernel's widest tile (32 lanes diagonal, BLOCK_M·k for
    blocks), not a fixed 64; T splits until about two programs per SM, pieces >= 512 steps."""
    pytest.importorskip("triton")
    from pararnn.kernels.triton_scan import lanes_per_program

    assert lanes_per_program(as_structure("diagonal", 64), 64) == 32
    assert lanes_per_program(as_structure(Block(2), 64), 64) == 2 * 32
    assert lanes_per_program(as_structure(Block(4), 64), 64) == 4 * 16
    monkeypatch.setattr(pararnn.kernels.dispatch, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert pararnn.kernels.dispatch.time_pieces(3, 5000, 64, cuda, lanes=32) == 5000 // 512  # 6 programs
    assert pararnn.kernels.dispatch.time_pieces(3, 1 << 16, 64, cuda, lanes=32) == 2 * 132 // 6
    assert pararnn.kernels.dispatch.time_pieces(64, 1 << 16, 256, cuda, lanes=32) == 1  # 512 programs: enough
    assert pararnn.kernels.dispatch.time_pieces(3, 1024, 64, cuda, lanes=32) == 1  # short: never split
