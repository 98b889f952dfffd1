"""Structures: storage <-> dense round trips and check_structure catching mis-declared cells."""
import pytest
import torch
from helpers import BlockTanh, DenseTanh, DiagGRU

import pararnn
from pararnn.structure import Block, Diagonal, as_structure


@pytest.mark.parametrize("structure", ["diagonal", Block(2), Block(3), Block(3, shared=True), "dense"])
def test_dense_round_trip(structure):
    st = as_structure(structure, 6)
    J = torch.randn(4, 5, *st.storage_shape(6))
    D = st.to_dense(J, 6)
    assert D.shape == (4, 5, 6, 6)
    assert torch.equal(st.from_dense(D), J)
    v = torch.randn(4, 5, 6)
    torch.testing.assert_close(st.matvec(J, v), (D @ v.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(st.to_dense(st.transpose(J), 6), D.transpose(-1, -2))
    # the autodiff probes of a linear map J v recover J
    probes = st.probe_tangents(20, 6, J.dtype, J.device)  # [P, 20, d]
    assert probes.shape[0] == st.width(6)
    Jf = J.reshape(20, *J.shape[2:])
    torch.testing.assert_close(st.assemble(torch.stack([st.matvec(Jf, e) for e in probes]), 6), Jf)
    # outer(λ, h) is the gradient of <λ, J h> with respect to J
    Jg = J.clone().requires_grad_(True)
    lam, h = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    (g,) = torch.autograd.grad((lam * st.matvec(Jg, h)).sum(), Jg)
    torch.testing.assert_close(st.outer(lam, h), g)


def test_block_validation():
    with pytest.raises(ValueError):
        Block(0)
    assert as_structure(Block(1), 4) == Diagonal()
    assert as_structure("dense", 4) == pararnn.Dense()
    with pytest.raises(ValueError, match="structure"):
        as_structure("tridiagonal", 4)
    with pytest.raises(ValueError, match="multiple of k"):
        as_structure(Block(3), 4)


@pytest.mark.parametrize("cell", [DiagGRU(3, 6), BlockTanh(3, 6, 2), BlockTanh(3, 6, 3), DenseTanh(3, 6)])
def test_correct_declarations_pass(cell):
    pararnn.check_structure(cell.double())


def test_dense_cell_declared_diagonal_is_caught():
    cell = DenseTanh(3, 6).double()
    cell.structure = "diagonal"
    with pytest.raises(ValueError, match="declares structure diagonal"):
        pararnn.check_structure(cell)


def test_block3_cell_declared_block2_is_caught():
    cell = BlockTanh(3, 6, 3).double()
    cell.structure = Block(2)
    with pytest.raises(ValueError, match="outside that structure"):
        pararnn.check_structure(cell)


def test_wrong_hand_written_jacobian_is_caught():
    class Bad(DiagGRU):
        def step_and_jacobian(self, h, u):
            f, J = super().step_and_jacobian(h, u)
            return f, J * 1.01

    with pytest.raises(ValueError, match="disagrees with autodiff"):
        pararnn.check_structure(Bad(3, 6).double())


def test_misdeclared_cell_gives_wrong_newton_answer_without_the_guard():
    """Why the guard exists: with a too-narrow Jacobian Newton stalls (it is reported, not hidden)."""
    cell = DenseTanh(3, 6).double()
    cell.structure = "diagonal"
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="declares structure diagonal"):  # the automatic probe
        pararnn.RNN(cell, max_iters=3, on_fail="raise")(x)
    rnn = pararnn.RNN(cell, max_iters=3, on_fail="raise", check_cell=False)  # opted out
    with pytest.raises(pararnn.ConvergenceError):
        rnn(x)


def test_run_transition_is_the_product_of_the_run():
    """The transition of a run of steps (a chunk's dh_last/dh0), against the dense product, at odd
    and even lengths (the pairwise tree carries an odd step)."""
    from pararnn.structure import run_transition

    for structure in ("diagonal", Block(2), Block(2, shared=True), "dense"):
        st = as_structure(structure, 4)
        for T in (1, 2, 5, 8):
            A = torch.randn(3, T, *st.storage_shape(4), dtype=torch.float64)
            want = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
            for t in range(T):
                want = st.to_dense(A[:, t], 4) @ want
            got = st.to_dense(run_transition(A, st), 4)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
