"""Every bad input to RNN gives one clear error naming the argument."""
import pytest
import torch
from helpers import make_cell

import pararnn


@pytest.fixture
def rnn():
    return pararnn.RNN(make_cell("diagonal", din=3, d=6))


X = lambda *s, **kw: torch.randn(*s, dtype=kw.pop("dtype", torch.float64), **kw)  # noqa: E731


@pytest.mark.parametrize(
    "args, err, match",
    [
        ((X(2, 5),), ValueError, r"x must be \[B, T, D_in\]"),
        ((X(2, 5, 3, 1),), ValueError, r"x must be \[B, T, D_in\]"),
        ((X(2, 5, 4),), ValueError, "input_size = 3"),
        ((X(2, 0, 3),), ValueError, "T = 0"),
        ((X(0, 5, 3),), ValueError, "B = 0"),
        ((torch.ones(2, 5, 3, dtype=torch.int64),), TypeError, "x must be a floating"),
        ((X(2, 5, 3, dtype=torch.float32),), TypeError, "x has dtype"),
        ((X(2, 5, 3, device="meta"),), ValueError, "x is on meta"),
        ((X(2, 5, 3), X(2, 5)), ValueError, r"h0 must be \[B, state\]"),
        ((X(2, 5, 3), X(3, 6)), ValueError, r"h0 must be \[B, state\]"),
        ((X(2, 5, 3), X(2, 6, dtype=torch.float32)), TypeError, "h0 has dtype"),
        ((X(2, 5, 3), X(2, 6, device="meta")), ValueError, "h0 is on meta"),
        ((X(2, 5, 3), [0.0] * 6), TypeError, "h0 must be a torch.Tensor"),
        (("not a tensor",), TypeError, "x must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_bad_input_rnn(rnn, args, err, match, mode):
    with pytest.raises(err, match=match):
        rnn(*args, mode=mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_sees_every_non_finite_entry(dtype, value):
    from pararnn.inputs import all_finite

    for n in (1, 7, 33, 1031):  # vector bodies and tails
        for pos in (0, n // 2, n - 1):
            x = torch.randn(3, n, dtype=torch.float64).to(dtype)
            assert all_finite(x) and all_finite(x.t())
            x[1, pos] = value if not dtype.is_complex else complex(0.5, value)
            assert not all_finite(x) and not all_finite(x.t()), (n, pos)
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(3))


@pytest.mark.parametrize("where", ["x", "h0"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(rnn, where, value):
    x, h0 = X(2, 5, 3), X(2, 6)
    (x if where == "x" else h0)[1, 0] = value
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        rnn(x, h0)
    # documented escape hatch: the check can be turned off; the NaN then flows through visibly
    # and the affected sequence is reported as not converged
    if where == "h0":
        with pytest.warns(pararnn.ConvergenceWarning):
            y, _, info = rnn(x, h0, check_finite=False, on_fail="warn", return_info=True)
        assert not torch.isfinite(y[1, :, 0]).any() and torch.isfinite(y[0]).all()
        assert info.converged.tolist() == [True, False]


def test_T_equals_one_works(rnn):
    x, h0 = X(2, 1, 3), X(2, 6)
    y, hT = rnn(x, h0)
    ys, _ = rnn(x, h0, mode="sequential")
    assert y.shape == (2, 1, 6) and torch.allclose(y, ys, atol=1e-13) and torch.equal(hT, y[:, -1])


def test_noncontiguous_input_works(rnn):
    x = X(5, 2, 3).transpose(0, 1)  # [2, 5, 3], non-contiguous
    h0 = X(6, 2).T
    y, _ = rnn(x, h0)
    ys, _ = rnn(x.contiguous(), h0.contiguous(), mode="sequential")
    assert torch.allclose(y, ys, atol=1e-12)


def test_requires_grad_on_h0_only(rnn):
    x, h0 = X(2, 7, 3), X(2, 6, requires_grad=True)
    for p in rnn.parameters():
        p.requires_grad_(False)
    y, _ = rnn(x, h0)
    (g,) = torch.autograd.grad(y.sum(), [h0])
    ys, _ = rnn(x, h0, mode="sequential")
    (gs,) = torch.autograd.grad(ys.sum(), [h0])
    assert torch.allclose(g, gs, atol=1e-12)


def test_unknown_solver_options_are_named_with_the_nearest_fields(rnn):
    cell = make_cell("diagonal", din=3, d=6)
    with pytest.raises(TypeError, match=r"unknown solver option 'max_iter'; did you mean 'max_iters'\?"):
        pararnn.RNN(cell, max_iter=3)
    with pytest.raises(TypeError, match=r"unknown solver option 'chunksize'; did you mean 'chunk_size'"):
        rnn(X(2, 5, 3), chunksize=2)  # a per-call override
    with pytest.raises(TypeError, match=r"unknown solver option 'zzz' \(the options are .*max_iters"):
        pararnn.RNN(cell, zzz=1)


def test_step_bad_input(rnn):
    with pytest.raises(ValueError, match="x_t must be"):
        rnn.step(X(2, 1, 3))


# ---------------------------------------------------------------- cells and the CLI
from pararnn.models import GRU, LRU, LSTM, DeltaProduct, SelectiveSSM  # noqa: E402


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: GRU(4, 6, heads=4), ValueError, "heads must divide"),
        (lambda: LSTM(4, 6, heads=0), ValueError, "heads must divide"),
        (lambda: LRU(4, 8, r_min=0.9, r_max=0.5), ValueError, "r_min"),
        (lambda: SelectiveSSM(4, 8, eigenvalue_range="(0,1)"), ValueError, "eigenvalue_range"),
        (lambda: DeltaProduct(4, 2, 2, n_h=0), ValueError, "n_h"),
        (lambda: GRU.from_torch(torch.nn.LSTM(2, 3)), TypeError, "expects a torch.nn.GRU"),
        (lambda: GRU.from_torch(torch.nn.GRU(2, 3, num_layers=2)), ValueError, "single-layer"),
        (lambda: LSTM.from_torch(torch.nn.LSTM(2, 4, proj_size=2)), ValueError, "no projection"),
        (lambda: GRU(2, 4, heads=2).to_torch(), ValueError, "heads == 1"),
        (lambda: pararnn.Block(-1), ValueError, "positive int"),
    ],
)
def test_bad_cell_arguments(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_cells_reject_wrong_input_size():
    rnn = pararnn.RNN(LRU(3, 4))
    with pytest.raises(ValueError, match="input_size = 3"):
        rnn(torch.randn(2, 5, 4))


def test_lru_h0_must_be_complex():
    rnn = pararnn.RNN(LRU(3, 4))
    with pytest.raises(TypeError, match="h0 has dtype"):
        rnn(torch.randn(2, 5, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("argv, match", [
    (["bench", "--cells", "paragru,transformer"], "unknown cell"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--repeats", "0"], "--repeats"),
])
def test_cli_bad_flags(argv, match, tmp_path):
    from pararnn_studies.cli import main

    with pytest.raises(SystemExit, match=match):
        main(argv + ["--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_cli_unknown_command():
    from pararnn_studies.cli import main

    with pytest.raises(SystemExit):
        main(["train"])
