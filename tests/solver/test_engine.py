"""Engine: parallel Newton solve == sequential loop, adjoint gradients == autograd, diagnostics."""
import warnings

import pytest
import torch
from helpers import AffineCell, BlockTanh, KINDS, make_cell, rel_err

import pararnn
from pararnn.models.paragru import ParaGRU


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 63, 1000])
@pytest.mark.parametrize("with_h0", [False, True])
def test_parallel_equals_sequential_fp64(kind, T, with_h0):
    cell = make_cell(kind)
    rnn = pararnn.RNN(cell)
    x = torch.randn(3, T, 3, dtype=torch.float64)
    h0 = torch.randn(3, cell.state_size, dtype=torch.float64) if with_h0 else None
    y, hT, info = rnn(x, h0, return_info=True)
    ys, hTs = rnn(x, h0, mode="sequential")
    assert y.shape == (3, T, cell.state_size) and hT.shape == (3, cell.state_size)
    assert info.all_converged
    assert rel_err(y, ys) < 1e-10
    assert rel_err(hT, hTs) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_parallel_equals_sequential_fp32(kind):
    cell = make_cell(kind, dtype=torch.float32)
    rnn = pararnn.RNN(cell)
    x = torch.randn(4, 300, 3)
    h0 = torch.randn(4, cell.state_size)
    y, _ = rnn(x, h0)
    ys, _ = rnn(x, h0, mode="sequential")
    assert rel_err(y, ys) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradients_equal_sequential_autograd(kind, backend):
    cell = make_cell(kind)
    rnn = pararnn.RNN(cell, backend=backend)
    x = torch.randn(2, 37, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, cell.state_size, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 37, cell.state_size, dtype=torch.float64)
    ghT = torch.randn(2, cell.state_size, dtype=torch.float64)
    wrt = [x, h0, *cell.parameters()]
    grads = {}
    for mode in ("parallel", "sequential"):
        y, hT = rnn(x, h0, mode=mode)
        grads[mode] = torch.autograd.grad((y * gy).sum() + (hT * ghT).sum(), wrt)
    for gp, gs in zip(grads["parallel"], grads["sequential"]):
        assert rel_err(gp, gs) < 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_of_h0_alone(kind):
    """Only h0 wants a gradient (frozen cell, x without grad): the graph-carrying evaluation has no
    graph, and h0's gradient comes from J_1^H λ_1 alone; with a padded last step too."""
    cell = make_cell(kind).requires_grad_(False)
    rnn = pararnn.RNN(cell)
    x = torch.randn(3, 29, 3, dtype=torch.float64)
    h0 = torch.randn(3, cell.state_size, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 29, cell.state_size, dtype=torch.float64)
    lengths = torch.tensor([29, 11, 1])
    for kw in ({}, {"lengths": lengths}):
        grads = [torch.autograd.grad((rnn(x, h0, mode=mode, **kw)[0] * gy).sum(), h0)[0]
                 for mode in ("parallel", "sequential")]
        assert grads[1].abs().max() > 0
        assert rel_err(*grads) < 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    cell = make_cell(kind, d=4 if kind != "block3" else 6)
    rnn = pararnn.RNN(cell)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, cell.state_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h0: rnn(x, h0), (x, h0))
    # every parameter, swapped in with torch.func.functional_call
    names = [n for n, _ in cell.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_() for p in cell.parameters())

    def f(*ps):
        return torch.func.functional_call(rnn, {"cell." + n: p for n, p in zip(names, ps)},
                                          (x.detach(), h0.detach()))[0]

    assert torch.autograd.gradcheck(f, values)


@pytest.mark.parametrize("structure", ["diagonal", pararnn.Block(2), pararnn.Block(3), "dense"])
@pytest.mark.parametrize("init", ["zeros", "step"])
def test_affine_cell_converges_in_one_step(structure, init):
    cell = AffineCell(3, 6, structure).double()
    x = torch.randn(2, 200, 3, dtype=torch.float64)
    rnn = pararnn.RNN(cell, init=init)
    y, _, info = rnn(x, return_info=True)
    assert info.iterations == 1, info.residuals
    assert rel_err(y, rnn(x, mode="sequential")[0]) < 1e-12


def test_newton_stops_early_and_reports():
    cell = make_cell("diagonal")
    rnn = pararnn.RNN(cell, max_iters=50)
    x = torch.randn(2, 100, 3, dtype=torch.float64)
    y, _ = rnn(x)
    info = rnn.solve_info(x)
    assert 1 <= info.iterations < 50
    assert len(info.residuals) == info.iterations + 1
    assert info.residuals[-1] <= info.atol + 2 * info.rtol * y.abs().max()
    assert info.converged.shape == (2,) and bool(info.converged.all())
    assert rnn.last_info is info


def test_warm_start_needs_no_iteration():
    cell = make_cell("dense")
    rnn = pararnn.RNN(cell)
    x = torch.randn(2, 50, 3, dtype=torch.float64)
    y, _ = rnn(x)
    y2, _, info = rnn(x, init=y.detach(), return_info=True)
    assert info.iterations == 0
    assert rel_err(y2, y) < 1e-14


def test_damping_still_converges_to_the_same_answer():
    cell = make_cell("diagonal")
    x = torch.randn(2, 60, 3, dtype=torch.float64)
    y, _, info = pararnn.RNN(cell, damping=0.7, max_iters=200)(x, return_info=True)
    ref, _ = pararnn.RNN(cell, mode="sequential")(x)
    assert info.all_converged and rel_err(y, ref) < 1e-10


class Chaotic(pararnn.Cell):
    """h' = tanh(4 h + u): expansive, Newton from a poor guess needs many steps."""

    structure = "diagonal"

    def __init__(self, d):
        super().__init__()
        self.state_size = d
        self.w = torch.nn.Parameter(torch.full((d,), 4.0, dtype=torch.float64))

    def step(self, h, u):
        return torch.tanh(self.w * h + u)


def test_nonconvergence_raise_warn_fallback():
    cell = Chaotic(3)
    x = torch.randn(4, 300, 3, dtype=torch.float64) * 0.1
    ref, _ = pararnn.RNN(cell, mode="sequential")(x)
    with pytest.raises(pararnn.ConvergenceError, match="did not converge"):
        pararnn.RNN(cell, max_iters=2, on_fail="raise")(x)
    with pytest.warns(pararnn.ConvergenceWarning):
        y, _, info = pararnn.RNN(cell, max_iters=2, on_fail="warn")(x, return_info=True)
    assert not info.all_converged and info.iterations == 2
    assert rel_err(y, ref) > 1e-3  # the unconverged iterate is really wrong, and was flagged
    with pytest.warns(pararnn.ConvergenceWarning, match="recomputed sequentially"):
        y, _, info = pararnn.RNN(cell, max_iters=2, on_fail="fallback")(x, return_info=True)
    assert bool(info.fell_back.all()) and rel_err(y, ref) < 1e-12


def test_fallback_only_for_affected_sequences_and_gradients():
    cell = Chaotic(2)
    x = torch.randn(3, 200, 2, dtype=torch.float64) * 0.1
    x[0] = 0.0  # a trivially easy sequence: h = 0 throughout, converges at once
    x.requires_grad_()
    rnn = pararnn.RNN(cell, max_iters=2)
    with pytest.warns(pararnn.ConvergenceWarning):
        y, _, info = rnn(x, return_info=True)
    assert info.fell_back.tolist() == [False, True, True]
    ys, _ = rnn(x, mode="sequential")
    assert rel_err(y, ys) < 1e-12
    g = torch.randn_like(y)
    (gp,) = torch.autograd.grad((y * g).sum(), [x])
    (gs,) = torch.autograd.grad((ys * g).sum(), [x])
    assert rel_err(gp, gs) < 1e-9


def test_step_decoding_matches_forward():
    cell = make_cell("block2")
    rnn = pararnn.RNN(cell)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    y, hT = rnn(x)
    h = None
    for t in range(9):
        yt, h = rnn.step(x[:, t], h)
        assert rel_err(yt, y[:, t]) < 1e-10
    assert rel_err(h, hT) < 1e-10


def test_memory_does_not_grow_with_iterations():
    """Bytes saved for backward are the same for a 1-iteration and a many-iteration solve."""
    cell = make_cell("diagonal")
    x = torch.randn(2, 100, 3, dtype=torch.float64, requires_grad=True)
    rnn = pararnn.RNN(cell)
    ref, _ = rnn(x)
    saved = {}
    for name, init in [("warm", ref.detach()), ("cold", "zeros")]:
        total = [0]

        def pack(t):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _, info = rnn(x, init=init, return_info=True)
        saved[name] = (total[0], info.iterations)
    assert saved["cold"][1] > saved["warm"][1] + 2
    assert saved["cold"][0] == saved["warm"][0]


def test_hand_written_jacobian_matches_torch_func():
    cell = ParaGRU(5, 8).double()
    u = cell.prepare(torch.randn(16, 1, 5, dtype=torch.float64))[:, 0]
    h = torch.randn(16, 8, dtype=torch.float64)
    f, J = cell.step_and_jacobian(h, u)
    f2, J2 = pararnn.autodiff_step_and_jacobian(cell.step, h, u, "diagonal")
    assert rel_err(f, f2) < 1e-14 and rel_err(J, J2) < 1e-13
    pararnn.check_structure(cell)


@pytest.mark.parametrize("name", ["paragru", "paralstm", "lstm", "deltanet"])
def test_autodiff_jacobian_reverse_and_forward_mode_agree(name):
    """Without a graph to keep (no_grad), the autodiff Jacobian comes from reverse mode (rows of J,
    assembled and transposed); with grad on, from torch.func's forward mode (columns, J keeps its
    graph). Both equal the hand-written one, for diagonal, 2×2-block, shared-block and dense J."""
    from pararnn.models import make_cell as zoo_cell
    from pararnn.structure import as_structure

    cell = zoo_cell(name, 6, **({"d_k": 2, "d_v": 3} if "delta" in name else {})).double()
    d = cell.state_size
    u = cell.prepare(torch.randn(9, 1, 6, dtype=torch.float64))[:, 0].detach()
    h = torch.randn(9, d, dtype=torch.float64)
    f, J = cell.step_and_jacobian(h, u)
    with torch.no_grad():
        f_rev, J_rev = pararnn.autodiff_step_and_jacobian(cell.step, h, u, cell.get_structure())
    h_grad = h.clone().requires_grad_()
    f_fwd, J_fwd = pararnn.autodiff_step_and_jacobian(cell.step, h_grad, u, cell.get_structure())
    assert J_fwd.requires_grad and not J_rev.requires_grad
    for ours in ((f_rev, J_rev), (f_fwd, J_fwd)):
        torch.testing.assert_close(ours[0], f, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(ours[1], J, rtol=1e-12, atol=1e-13)

    # a step that ignores h (or uses it through nothing differentiable): J = 0 either way
    for structure in ("diagonal", pararnn.Block(3), "dense"):
        for step in (lambda h, u: torch.ones_like(h) * u.sum(-1, keepdim=True), lambda h, u: h.detach() * 2):
            with torch.no_grad():
                J0 = pararnn.autodiff_step_and_jacobian(step, h, u, structure)[1]
            assert J0.abs().max() == 0 and J0.shape == (9, *as_structure(structure, d).storage_shape(d))


def test_choose_mode():
    cpu = torch.device("cpu")
    # the measured cases of README "Choosing a mode"
    assert pararnn.choose_mode(1, 16384, 64, cpu) == "parallel"
    assert pararnn.choose_mode(1, 16384, 64, cpu, training=False) == "parallel"
    assert pararnn.choose_mode(8, 4096, 256, cpu, training=True) == "sequential"
    assert pararnn.choose_mode(1, 4096, 64, cpu, "dense", training=True) == "parallel"  # GRU
    assert pararnn.choose_mode(1, 4096, 64, cpu, "dense", training=False) == "sequential"
    assert pararnn.choose_mode(1, 4096, 128, cpu, "dense", training=True) == "sequential"  # LSTM
    # ParaLSTM (2×2 blocks: 4× a diagonal's work per entry), compiled (results/bench_auto_*)
    assert pararnn.solver.mode.step_work(1, 128, pararnn.Block(2)) == 4 * pararnn.solver.mode.step_work(1, 128)
    assert pararnn.choose_mode(1, 4096, 128, cpu, pararnn.Block(2), training=False, compile_cell=True) == "parallel"
    assert pararnn.choose_mode(4, 4096, 128, cpu, pararnn.Block(2), training=False, compile_cell=True) == "sequential"
    assert pararnn.choose_mode(4, 4096, 128, cpu, pararnn.Block(2), training=True, compile_cell=True) == "parallel"
    assert pararnn.choose_mode(16, 4096, 128, cpu, pararnn.Block(2), training=True, compile_cell=True) == "sequential"
    # an unshared Block(k) cell takes those limits uncompiled too (its eager evaluation is as fast),
    # a shared one (DeltaNet) only compiled
    for cc in (False, True):
        assert pararnn.choose_mode(1, 4096, 128, cpu, pararnn.Block(2), training=False, compile_cell=cc) == "parallel"
        assert pararnn.choose_mode(4, 4096, 128, cpu, pararnn.Block(2), training=True, compile_cell=cc) == "parallel"
    # Block(1) is a diagonal (as_structure): eager, the eager limits (a work of 2048 at inference: the loop)
    assert pararnn.choose_mode(1, 4096, 256, cpu, pararnn.Block(1), training=False) == "sequential"
    assert pararnn.choose_mode(1, 4096, 256, cpu, pararnn.Block(1), training=False, compile_cell=True) == "parallel"
    shared = pararnn.Block(8, shared=True)
    assert pararnn.choose_mode(1, 4096, 8, cpu, shared, training=False) == "sequential"
    assert pararnn.choose_mode(1, 4096, 8, cpu, shared, training=False, compile_cell=True) == "parallel"
    # compile_cell: four times the work per step (ParaGRU B = 8, d = 512 trains in parallel; B = 1,
    # d = 512 infers so; results/bench_auto_grid_*)
    assert pararnn.choose_mode(8, 4096, 512, cpu, training=True, compile_cell=True) == "parallel"
    assert pararnn.choose_mode(32, 4096, 256, cpu, training=True, compile_cell=True) == "sequential"
    assert pararnn.choose_mode(8, 4096, 256, cpu, training=False, compile_cell=True) == "sequential"
    assert pararnn.choose_mode(1, 4096, 512, cpu, training=False) == "sequential"
    assert pararnn.choose_mode(1, 4096, 512, cpu, training=False, compile_cell=True) == "parallel"
    assert pararnn.choose_mode(1, 4096, 128, cpu, "dense", training=True, compile_cell=True) == "sequential"  # LSTM
    assert pararnn.choose_mode(1, 4096, 64, cpu, "dense", training=False, compile_cell=True) == "sequential"
    # RNN(mode="auto") passes compile_cell to the rule
    x = torch.randn(2, 64, 4)
    with torch.no_grad():
        for cc, mode in ((False, "sequential"), (True, "parallel")):
            rnn = pararnn.RNN(ParaGRU(4, 128), mode="auto", compile_cell=cc)
            rnn(x)
            assert rnn.last_info.mode == mode
    # CUDA (the rule needs no device): parallel only where a Triton kernel exists, never the loop
    cuda = torch.device("cuda")
    from pararnn.kernels.dispatch import triton_module
    if triton_module() is not None:
        assert pararnn.choose_mode(1, 4096, 64, cuda) == "parallel"
        assert pararnn.choose_mode(1, 4096, 64, cuda, pararnn.Block(4)) == "parallel"
    for structure, dtype in [("dense", torch.float32), (pararnn.Block(8), torch.float32),
                             (pararnn.Block(4, shared=True), torch.float32), ("diagonal", torch.float64)]:
        # no Triton kernel: the log-depth PyTorch scan, not the loop over T
        assert pararnn.kernels.dispatch.auto_backend(cuda, dtype, pararnn.structure.as_structure(structure, 64), 64) \
            == "assoc"
        assert pararnn.choose_mode(1, 4096, 64, cuda, structure, dtype=dtype) == "parallel"
    assert pararnn.choose_mode(1, 4096, 64, cpu, backend="reference") == "parallel"  # the user's choice
    assert pararnn.choose_mode(1, 32, 64, cpu) == "sequential"
    assert pararnn.choose_mode(64, 128, 1024, torch.device("cuda")) == "parallel"
    cell = make_cell("diagonal")
    rnn = pararnn.RNN(cell, mode="auto")
    x = torch.randn(1, 100, 3, dtype=torch.float64)
    y, _, info = rnn(x, return_info=True)
    assert info.mode == "parallel" and y.shape == (1, 100, 6)
    assert rnn(x[:, :10], return_info=True)[2].mode == "sequential"


def test_numba_free_fallback_gives_the_same_answer():
    cell = make_cell("block2")
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    a, _ = pararnn.RNN(cell, backend="reference")(x)
    b, _ = pararnn.RNN(cell, backend="cpu")(x)
    assert rel_err(a, b) < 1e-13


def test_options_are_validated():
    cell = make_cell("diagonal")
    for bad in [dict(max_iters=0), dict(on_fail="ignore"), dict(damping=0.0), dict(damping=1.5),
                dict(init="random"), dict(rtol=-1.0), dict(eval_chunk=0)]:
        with pytest.raises(ValueError):
            pararnn.RNN(cell, **bad)
    with pytest.raises(ValueError, match="mode"):
        pararnn.RNN(cell, mode="fast")
    with pytest.raises(TypeError, match="pararnn.Cell"):
        pararnn.RNN(torch.nn.Linear(2, 2))


def test_no_warning_on_normal_use():
    cell = make_cell("diagonal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pararnn.RNN(cell)(torch.randn(2, 30, 3, dtype=torch.float64))


def test_solve_stats_and_hooks_report_every_solve():
    cell = make_cell("dense")
    rnn = pararnn.RNN(cell, max_iters=2)
    seen = []
    handle = rnn.register_solve_hook(lambda m, info: seen.append((m is rnn, info.iterations)))
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rnn(x)
        rnn(x, mode="sequential")
    assert seen == [(True, rnn.stats.newton_steps), (True, 0)]
    st = rnn.stats.summary()
    assert st["calls"] == 2 and st["parallel_calls"] == 1 and st["sequences"] == 2
    assert st["fell_back"] == int(rnn.stats.fell_back) and st["max_newton_steps"] <= 2
    handle.remove()
    rnn(x, max_iters=30)
    assert len(seen) == 2 and rnn.stats.calls == 3
    rnn.stats.reset()
    assert rnn.stats.calls == 0
    from pararnn.models import SequenceModel

    model = SequenceModel(5, 3, d_model=8, n_layers=2)
    model(torch.randint(0, 5, (2, 12)))
    assert [s["parallel_calls"] for s in model.solver_stats()] == [1, 1]


@pytest.mark.parametrize("make", [lambda: pararnn.models.GRU(3, 6), lambda: pararnn.models.DeltaNet(3, 4, 5),
                                  lambda: BlockTanh(3, 16, 8)], ids=["dense", "shared_block", "block8"])
def test_newton_with_the_log_depth_scan(make):
    """backend="assoc" (CUDA's path for structures without a Triton kernel), fp64: the parallel
    solve and its gradients equal the sequential loop's."""
    torch.manual_seed(0)
    cell = make().double()
    x = torch.randn(2, 37, 3, dtype=torch.float64, requires_grad=True)
    outs = []
    for rnn in (pararnn.RNN(cell, backend="assoc"), pararnn.RNN(cell, mode="sequential")):
        y, hT = rnn(x)
        outs.append((y, *torch.autograd.grad(y.square().sum() + hT.sum(), [x, *cell.parameters()])))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-10


def test_evaluation_pieces_are_sized_by_the_jacobian_too():
    """A dense cell's step_and_jacobian is called on pieces holding about eval_chunk state elements
    and at most 2·eval_chunk Jacobian entries; the answer does not depend on the piece size."""
    from pararnn.models import GRU

    torch.manual_seed(0)
    cell = GRU(3, 8).double()
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    rows = []
    orig = cell.step_and_jacobian

    def spy(h, u):
        rows.append(h.shape[0])
        return orig(h, u)

    cell.step_and_jacobian = spy
    # per step and row: state 8 entries, Jacobian 64: pieces of 64 // 32 = 2 steps of one row (N = 2);
    # sized by the state alone they would hold 8 steps
    y_small = pararnn.RNN(cell, mode="parallel", eval_chunk=64, check_cell=False)(x)[0]
    assert rows and max(rows) == 2
    rows.clear()
    y_large = pararnn.RNN(cell, mode="parallel", eval_chunk=1 << 20, check_cell=False)(x)[0]
    assert max(rows) == 2 * 40
    torch.testing.assert_close(y_small, y_large, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["lru", "ssm", "ssm_neg", "cssm", "deltanet", "deltaproduct", "paragru", "gru",
                                  "paralstm"])
def test_affine_cells_start_from_zeros_and_take_one_newton_step(name):
    """The one-off cell check finds which cells are affine in h (init="auto" then starts Newton from
    zeros): the linear zoo cells are solved in one Newton step in fp32, as accurately as the fp32
    loop against fp64; the nonlinear ones are not affine and start from f(h0, u_t)."""
    import copy

    from pararnn.models import make_cell

    torch.manual_seed(0)
    cell = make_cell(name, 16, **({"d_k": 16} if name.startswith("delta") else {}))
    x = torch.randn(2, 2048, 16)
    y, _, info = pararnn.RNN(cell, mode="parallel")(x, return_info=True)
    affine = name not in ("paragru", "gru", "paralstm")
    assert cell.__dict__["_pararnn_facts"].affine is affine
    if affine:
        ref = pararnn.RNN(copy.deepcopy(cell).double(), mode="sequential")(x.double())[0]
        loop = pararnn.RNN(cell, mode="sequential")(x)[0]
        assert info.iterations == 1, info.residuals
        assert rel_err(y.to(ref.dtype), ref) <= 2 * rel_err(loop.to(ref.dtype), ref) + 1e-7


def test_pieces_are_contiguous_cover_everything_and_have_no_stub_tails():
    from pararnn.solver.evaluate import contiguous_pieces

    for B, T, per_step, target in [(3, 40, 6, 60), (8, 4096, 256, 1 << 18), (5, 7, 2, 1000), (2, 71, 6, 60),
                                   (1, 1, 64, 1), (4, 10, 3, 30)]:
        pieces = contiguous_pieces(B, T, per_step, target)
        seen = torch.zeros(B, T, dtype=torch.int64)
        for b0, b1, t0, t1 in pieces:
            seen[b0:b1, t0:t1] += 1
            assert b1 - b0 == 1 or (t0, t1) == (0, T)  # one run of memory in a [B, T, ...] buffer
            assert (b1 - b0) * (t1 - t0) * per_step <= max(target, per_step)
        assert bool((seen == 1).all()), (B, T)
        lengths = {t1 - t0 for _, _, t0, t1 in pieces}
        assert max(lengths) - min(lengths) <= 1  # even spans: no stub of length 1 at the end


def test_compiled_pieces_hold_one_sequence_where_a_sequence_is_long_enough():
    """A compiled piece of several sequences is three passes with temporaries, of one sequence one
    fused loop: sequences of at least eval_chunk / 2 elements get pieces of their own."""
    from pararnn.solver.evaluate import COMPILED_CHUNK_FACTOR, ONE_ROW_DIVISOR, pieces_for

    chunk = 1 << 10
    row = chunk // ONE_ROW_DIVISOR  # d = 16, T = row / 16: the smallest sequence that gets its own piece
    assert pieces_for(8, row // 16, 16, chunk, compiled=True) == [(b, b + 1, 0, row // 16) for b in range(8)]
    several = pieces_for(8, row // 32, 16, chunk, compiled=True)  # half as long: several in a piece
    assert several == [(0, 8, 0, row // 32)]  # 8 · 256 elements, within one compiled piece of 4 · 1024
    assert pieces_for(8, row // 16, 16, chunk, compiled=False) == [(2 * i, 2 * i + 2, 0, row // 16) for i in range(4)]
    # longer than a compiled piece: one sequence in time spans, as before
    spans = pieces_for(2, 16 * chunk // 16, 16, chunk, compiled=True)
    assert len(spans) == 2 * 16 // COMPILED_CHUNK_FACTOR and all(b1 - b0 == 1 for b0, b1, _, _ in spans)


def test_kept_buffers_never_leak_into_results_or_gradients():
    """Without gradients the solver's buffers are kept for the next call (pararnn.workspace): the
    returned states are copies, two calls in a row are both right, and with gradients two forwards
    before one backward keep their own states and Jacobians."""
    from pararnn import workspace

    torch.manual_seed(0)
    cell = ParaGRU(3, 8).double()
    par, seq = pararnn.RNN(cell, mode="parallel"), pararnn.RNN(cell, mode="sequential")
    x1, x2 = torch.randn(2, 50, 3, dtype=torch.float64), torch.randn(2, 50, 3, dtype=torch.float64)
    workspace.clear()
    with torch.no_grad():
        y1 = par(x1)[0]
        kept = workspace.kept_bytes()
        y2 = par(x2)[0]
        assert kept > 0 and workspace.kept_bytes() == kept  # the same buffers, not new ones
        torch.testing.assert_close(y1, seq(x1)[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(y2, seq(x2)[0], rtol=1e-10, atol=1e-12)
    workspace.clear()
    with torch.inference_mode():  # buffers made here are inference tensors: never reused outside it
        y3 = par(x1)[0]
    torch.testing.assert_close(par(x1)[0], y3)
    x1.requires_grad_(True), x2.requires_grad_(True)
    ya, yb = par(x1)[0], par(x2)[0]
    g = torch.autograd.grad((ya * ya).sum() + yb.sum(), [x1, x2])
    za, zb = seq(x1)[0], seq(x2)[0]
    g_ref = torch.autograd.grad((za * za).sum() + zb.sum(), [x1, x2])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # One sequence (its graph reads the previous states as a view of S, no copy) and an odd number
    # of Newton steps (the solution lands in the safeguard's second, kept, iterate buffer): the
    # returned S must still be the solve's own.
    cell32 = ParaGRU(3, 8)
    par32, seq32 = pararnn.RNN(cell32, mode="parallel"), pararnn.RNN(cell32, mode="sequential")
    x1, x2 = torch.randn(1, 50, 3, requires_grad=True), torch.randn(1, 50, 3, requires_grad=True)
    ya = par32(x1)[0]
    assert par32.last_info.iterations % 2 == 1
    yb = par32(x2)[0]
    g = torch.autograd.grad((ya * ya).sum() + yb.sum(), [x1, x2])
    za, zb = seq32(x1)[0], seq32(x2)[0]
    g_ref = torch.autograd.grad((za * za).sum() + zb.sum(), [x1, x2])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    workspace.clear()
    assert workspace.kept_bytes() == 0


def test_workspace_is_bounded_and_not_shared_by_nested_solves(monkeypatch):
    from pararnn import workspace

    workspace.clear()
    monkeypatch.setattr(workspace, "WORKSPACE_BYTES", 1000)
    with workspace.workspace(torch.device("cpu")) as ws:
        a = ws.take("a", (100,), torch.float32, "cpu")  # 400 bytes: kept
        assert ws.take("a", (100,), torch.float32, "cpu") is a
        ws.take("b", (200,), torch.float32, "cpu")  # 800 more: "a" goes, least recently used
        assert workspace.kept_bytes() == 800
        ws.take("c", (1000,), torch.float32, "cpu")  # larger than the whole budget: never kept
        assert workspace.kept_bytes() == 800
        with workspace.workspace(torch.device("cpu")) as inner:  # a solve inside a solve
            assert inner is not ws and inner.take("b", (200,), torch.float32, "cpu") is not None
            assert workspace.kept_bytes() == 800
    with workspace.workspace(torch.device("meta")) as other:  # not a CPU: always fresh buffers
        assert other is not ws
    workspace.clear()


@pytest.mark.parametrize("safeguard", [True, False])
def test_newton_update_inside_the_scan_is_bit_identical(monkeypatch, safeguard):
    """Each Newton step writes ``H + δ`` from the scan's own pass (``base=H``); the same solve with
    the scan and the add apart gives the same bits, and the fused path is the one taken."""
    from pararnn.kernels import dispatch
    from pararnn.solver import safeguard as solver_safeguard

    torch.manual_seed(0)
    cell = ParaGRU(3, 8)
    x = torch.randn(2, 300, 3)
    bases = []
    real_scan = dispatch.scan

    def spy(*args, base=None, **kw):
        bases.append(base is not None)
        return real_scan(*args, base=base, **kw)

    monkeypatch.setattr(dispatch, "scan", spy)
    rnn = pararnn.RNN(cell, mode="parallel", safeguard=safeguard)
    with torch.no_grad():
        fused, _, info = rnn(x, return_info=True)
        # the last scan is ParaGRU's correction check at the solution (no update: no base)
        assert info.iterations >= 2 and bases == [True] * info.iterations + [False]
        monkeypatch.setattr(solver_safeguard.StepPolicy, "keeps_updates", lambda self: False)
        bases.clear()
        apart, _ = rnn(x)
        assert bases == [False] * (info.iterations + 1)
    assert torch.equal(fused, apart)


@pytest.mark.parametrize("eval_chunk", [16, 250, 1 << 12])  # a row's time spans, rows 1 + 2, one piece
@torch.no_grad()  # as in the solver
def test_evaluate_measures_do_not_depend_on_the_pieces(eval_chunk):
    """max|r| and q per sequence are the same whatever the pieces (time spans of one row, whole
    rows, one piece), and a NaN in one span of one sequence reaches that sequence's measures only;
    the plans a solve keeps give the same measures again."""
    from pararnn.solver.evaluate import evaluate

    torch.manual_seed(0)
    cell = ParaGRU(3, 4).double()
    B, T, d = 3, 30, 4
    u = cell.prepare(torch.randn(B, T, 3, dtype=torch.float64))
    S = torch.randn(B, T + 1, d, dtype=torch.float64)
    S[1, 17, 2] = float("nan")
    r, J = torch.empty(B, T, d, dtype=torch.float64), torch.empty(B, T, d, dtype=torch.float64)
    want = evaluate(cell, S, u, r, J, 1 << 20, 1e-300)
    plans = {}
    for _ in range(2):
        got = evaluate(cell, S, u, r, J, eval_chunk, 1e-300, plans=plans)
        for g, w in zip(got, want):
            assert g.shape == (B,)
            torch.testing.assert_close(g, w, equal_nan=True)
    assert bool(want[0][1].isnan()) and not bool(want[0][[0, 2]].isnan().any())
    assert torch.equal(evaluate(cell, S, u, r, J, eval_chunk, 1e-300, measure="err")[0].isnan(), want[0].isnan())


def _float64_and_loop(cell, x):
    """The float64 loop's states for ``cell`` on ``x`` and the fp32 loop's relative error to them."""
    ref = pararnn.RNN(type(cell)(cell.input_size, cell.state_size).double(), mode="sequential")
    ref.cell.load_state_dict(cell.state_dict())
    want = ref(x.double())[0]
    return want, rel_err(pararnn.RNN(cell, mode="sequential")(x)[0], want)


class _ParaGRUWithoutScale(ParaGRU):
    """ParaGRU without its rounding scale: the test reads |f| + |J||h| alone."""

    def step_jacobian_and_scale(self, h, u):
        return (*self.step_and_jacobian(h, u), None)


@torch.no_grad()
@pytest.mark.parametrize("seed", [0, 1])
def test_a_cells_rounding_scale_saves_a_newton_step_and_no_accuracy(seed):
    """ParaGRU's f = (1-z) h + z c cancels near 0, which |f| + |J||h| does not see: without the
    cell's scale ((1-z)|h| + z|c|) the test asks for a fourth Newton step that changes nothing
    measurable. With it the solve stops after three, as close to float64 as the fp32 loop."""
    torch.manual_seed(seed)
    cell = ParaGRU(16, 256)
    plain = _ParaGRUWithoutScale(16, 256)
    plain.load_state_dict(cell.state_dict())
    x = torch.randn(4, 256, 16)
    want, loop = _float64_and_loop(cell, x)
    steps = {}
    for name, c in (("scale", cell), ("plain", plain)):
        rnn = pararnn.RNN(c)
        err = rel_err(rnn(x)[0], want)
        steps[name] = rnn.last_info.iterations
        assert err <= 2 * loop, (name, err, loop)
    assert steps["scale"] < steps["plain"], steps


@torch.no_grad()
def test_padded_steps_ignore_the_cells_rounding_scale():
    """Where the mask pads a step (f = h_prev, J = I), q reads the plain scale, whatever s says."""
    from pararnn.solver.evaluate import evaluate

    class Loose(ParaGRU):
        def step_jacobian_and_scale(self, h, u):
            f, J = self.step_and_jacobian(h, u)
            return f, J, torch.full_like(f, 1e30)

    torch.manual_seed(0)
    loose, plain = Loose(3, 4), _ParaGRUWithoutScale(3, 4)
    plain.load_state_dict(loose.state_dict())
    B, T, d = 2, 20, 4
    u = loose.prepare(torch.randn(B, T, 3))
    S = torch.randn(B, T + 1, d)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1] = False  # sequence 1 entirely padded
    r, J = torch.empty(B, T, d), torch.empty(B, T, d)
    q_loose = evaluate(loose, S, u, r, J, 1 << 20, 0.0, None, mask)[1]
    q_plain = evaluate(plain, S, u, r, J, 1 << 20, 0.0, None, mask)[1]
    assert q_loose[0] < 1e-20 < q_plain[0]  # the scale enters where steps are real
    assert q_loose[1] == q_plain[1] > 0


@pytest.mark.parametrize("bad", ["below_f", "shape", "other_f"])
def test_the_cell_check_rejects_a_wrong_rounding_scale(bad):
    """check_cell probes step_jacobian_and_scale: s must be at least |f| (it bounds f's terms), of
    f's shape, and come with step_and_jacobian's f and J."""

    class Wrong(ParaGRU):
        def step_jacobian_and_scale(self, h, u):
            f, J = self.step_and_jacobian(h, u)
            if bad == "below_f":
                return f, J, 0.5 * f.abs()
            if bad == "shape":
                return f, J, f.abs()[:, :1]
            return f + 1, J, f.abs()

    torch.manual_seed(0)
    with pytest.raises(pararnn.CellCheckError, match="step_jacobian_and_scale"):
        pararnn.RNN(Wrong(3, 4))(torch.randn(2, 10, 3))
    pararnn.RNN(ParaGRU(3, 4))(torch.randn(2, 10, 3))  # the zoo's own passes


@torch.no_grad()
def test_a_cells_rounding_scale_does_not_let_an_amplifying_cell_stop_early():
    """With a_std = 1.0 ParaGRU amplifies along T: after its 5th Newton step every residual passes
    against the cell's rounding scale (max 1.7e-6), yet the iterate was 8.9e-6 from float64, where
    the fp32 loop is 3.3e-6. The Newton correction at the iterate (one scan) sees that error, so
    the solve takes the 6th step and ends as close as the loop."""
    torch.manual_seed(0)
    cell = ParaGRU(64, 64)
    cell.a.normal_(0, 1.0)
    torch.manual_seed(1)
    x = torch.randn(1, 4096, 64)
    want, loop = _float64_and_loop(cell, x)
    assert rel_err(pararnn.RNN(cell)(x)[0], want) <= 1.5 * loop


@torch.no_grad()
def test_the_correction_check_stops_where_steps_stop_shrinking_it():
    """ParaGRU a_std 2.0 (a latch: |J| up to 2.8) reaches the rounding floor after 5 Newton steps,
    but the cell carries those residuals along T into a correction above ``rtol·max|h|`` that no
    step removes: the check took every step up to max_iters (30). A correction the last step did
    not shrink passes, so the solve ends at the next step, as close to float64 as the fp32 loop."""
    torch.manual_seed(1)
    cell = ParaGRU(64, 64)
    cell.a.normal_(0, 2.0)
    x = torch.randn(4, 4096, 64, generator=torch.Generator().manual_seed(11))
    rnn = pararnn.RNN(cell)
    y = rnn(x)[0]
    assert rnn.last_info.iterations <= 8, rnn.last_info.residuals
    assert bool(rnn.last_info.converged.all()) and not bool(rnn.last_info.fell_back.any())
    want, loop = _float64_and_loop(cell, x)
    assert rel_err(y, want) <= 1.5 * loop

def test_max_abs_matches_abs_amax_per_sequence():
    """The correction check's per-sequence max|t| (no temporary of t's size) equals
    ``t.abs().amax`` over all but the batch dim: on a strided view (H = S[:, 1:]), with the
    largest entry negative, with NaN (propagates) and for complex t."""
    from pararnn.solver.evaluate import max_abs

    torch.manual_seed(0)
    S = torch.randn(3, 6, 4)
    S[1, 3, 2] = -50.0  # sequence 1's largest entry is negative
    S[2, 4, 0] = float("nan")
    H = S[:, 1:]
    got = max_abs(H)
    torch.testing.assert_close(got, H.abs().amax(dim=(1, 2)), equal_nan=True)
    assert got[1] == 50.0 and torch.isnan(got[2])
    z = torch.randn(2, 5, 3, dtype=torch.complex64)
    torch.testing.assert_close(max_abs(z), z.abs().amax(dim=(1, 2)))
