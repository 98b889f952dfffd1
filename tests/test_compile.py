"""torch.compile: the scans are custom ops (opcheck), linear_scan compiles with fullgraph=True, and a
model compiles on the first call of a fresh process, forward and backward, with one graph break
per solve."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import pararnn
from pararnn.scan import op as ops


@pytest.mark.parametrize("structure, jac", [("diagonal", (4,)), ("Block(2)", (2, 2, 2)), ("dense", (4, 4))])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_op_passes_opcheck(structure, jac, reverse):
    A = (0.5 * torch.randn(2, 9, *jac, dtype=torch.float64)).requires_grad_()
    b = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.scan, (A, b, h0, structure, reverse, False, "auto"))
    torch.library.opcheck(ops.scan, (A, b, None, structure, reverse, True, "cpu"))
    # opcheck checks the registrations, not the numbers: gradcheck both variants
    for adjoint in (False, True):
        assert torch.autograd.gradcheck(
            lambda A, b: ops.scan(A, b, None, structure, reverse, adjoint, "auto"), (A, b))


def test_op_structure_round_trips_builtin_structures_only():
    for s in (pararnn.Diagonal(), pararnn.Dense(), pararnn.Block(3), pararnn.Block(4, shared=True)):
        assert ops.op_structure(s) == str(s)

    class Odd(pararnn.Diagonal):
        def __str__(self):
            return "odd"

    assert ops.op_structure(Odd()) is None


SCRIPT = textwrap.dedent("""
    import torch, pararnn
    from pararnn.models import SequenceModel
    torch.manual_seed(0)
    # linear_scan, fullgraph: no graph break at all, values and gradients as eager
    f = torch.compile(pararnn.linear_scan, fullgraph=True)
    A = (0.5 * torch.randn(2, 40, 2, 2, 2, dtype=torch.float64)).requires_grad_()
    b = torch.randn(2, 40, 4, dtype=torch.float64, requires_grad=True)
    y = f(A, b, None, pararnn.Block(2), reverse=True)
    yr = pararnn.linear_scan(A, b, None, pararnn.Block(2), reverse=True, backend="reference")
    torch.testing.assert_close(y, yr)
    for g, gr in zip(torch.autograd.grad(y.sin().sum(), [A, b]), torch.autograd.grad(yr.sin().sum(), [A, b])):
        torch.testing.assert_close(g, gr)
    # a model, compiled before any eager call: first call forward and backward
    model = SequenceModel(11, 5, d_model=8, n_layers=2, cell="paragru").double()
    x = torch.randint(0, 11, (2, 48))
    compiled = torch.compile(model)
    out = compiled(x, lengths=torch.tensor([48, 7]))[0]
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref = model(x, lengths=torch.tensor([48, 7]))[0]
    torch.testing.assert_close(out, ref)
    for g, gr in zip(grads, torch.autograd.grad(ref.square().sum(), list(model.parameters()))):
        torch.testing.assert_close(g, gr)
    assert model.blocks[0].rnn.last_info.mode == "parallel"
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    print("graph breaks", explained.graph_break_count)
    assert explained.graph_break_count == 2, explained.graph_break_count  # one per layer's solve
""")


def test_compile_on_the_first_call_of_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "graph breaks 2" in r.stdout


# ------------------------------------------------------------------ compile_cell: the fused evaluation
def test_compiled_evaluation_matches_the_eager_twin_and_compiles_once_for_every_T():
    """solver.evaluate.evaluate(compiled=True) (torch.compile of evaluate_piece) against the eager twin:
    residuals, Jacobians and the per-sequence reductions, with a padding mask; then a solve with
    compile_cell=True equals the eager solve (values and gradients), and new T and B reuse the
    compiled graph."""
    from torch._dynamo.utils import counters

    from pararnn.solver import compile as solver_compile
    from pararnn.models import ParaGRU
    from pararnn.solver.evaluate import evaluate

    torch.manual_seed(0)
    cell = ParaGRU(5, 6)
    B, T, d = 3, 40, 6
    with torch.no_grad():
        u = cell.prepare(torch.randn(B, T, 5))
    S = torch.randn(B, T + 1, d)
    mask = torch.rand(B, T) > 0.2
    outs = []
    for compiled in (False, True):
        r, J = torch.empty(B, T, d), torch.empty(B, T, d)
        with torch.no_grad():
            err, q = evaluate(cell, S, u, r, J, 90, 1e-30, None, mask, compiled=compiled)  # 5 steps a chunk
        outs.append((r, J, err, q))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.equal(outs[0][0], torch.zeros_like(outs[0][0]))

    x = torch.randn(B, T, 5, requires_grad=True)
    eager = pararnn.RNN(cell, mode="parallel")
    comp = pararnn.RNN(cell, mode="parallel", compile_cell=True)
    solver_compile._WARNED_JVP.discard(ParaGRU)  # so that a wrong warning could not have been spent earlier
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (ye, he), (yc, hc) = eager(x), comp(x)
    assert not [w for w in caught if "torch.func.jvp" in str(w.message)]  # a hand-written Jacobian: no warning
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hc, he, rtol=1e-5, atol=1e-6)
    assert comp.last_info.iterations == eager.last_info.iterations
    ge = torch.autograd.grad(ye.sum(), [x, *cell.parameters()])
    gc = torch.autograd.grad(yc.sum(), [x, *cell.parameters()])
    for a, b in zip(ge, gc):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # Pieces of several whole rows, of one whole row (B = 1 is specialised), and of one row in time
    # chunks (a row longer than eval_chunk): each kind compiles once, then no new B or T recompiles.
    small = pararnn.RNN(cell, mode="parallel", compile_cell=True, eval_chunk=60)
    with torch.no_grad():
        comp(torch.randn(1, 40, 5))
        for B2, T2 in [(2, 33), (1, 9), (2, 50)]:  # (2, 50): rows longer than a compiled piece (4 × 60)
            small(torch.randn(B2, T2, 5))
            assert torch.equal(small.last_info.converged, torch.ones(B2, dtype=torch.bool))
    # the same with gradients: the graph-carrying evaluation at the solution (graph_piece) is compiled
    # too, once per kind of piece, with and without a padding mask
    def grads(rnn, x, **kw):
        y, hT = rnn(x, **kw)
        return torch.autograd.grad((y * torch.linspace(-1, 1, x.shape[1])[:, None]).sum() + hT.sum(),
                                   [x, *cell.parameters()])

    for B2, T2 in [(3, 40), (1, 40), (1, 9), (2, 50)]:
        xs = torch.randn(B2, T2, 5, requires_grad=True)
        for kw in ({}, {"lengths": torch.randint(1, T2 + 1, (B2,))}):
            for rnn in (comp, small):
                for a, b in zip(grads(eager, xs, **kw), grads(rnn, xs, **kw)):
                    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for B2, T2 in [(2, 71), (4, 9), (3, 300), (1, 55)]:
            comp(torch.randn(B2, T2, 5))
            xs = torch.randn(B2, T2, 5)
            torch.testing.assert_close(small(xs)[0], eager(xs)[0], rtol=1e-5, atol=1e-6)
    for B2, T2 in [(2, 71), (4, 9), (1, 55)]:
        xs = torch.randn(B2, T2, 5, requires_grad=True)
        for kw in ({}, {"lengths": torch.randint(1, T2 + 1, (B2,))}):
            grads(comp, xs, **kw), grads(small, xs, **kw)
    assert counters["stats"]["unique_graphs"] == graphs, "a new T or B recompiled the cell evaluation"


def test_compile_cell_is_validated():
    with pytest.raises(TypeError, match="compile_cell"):
        pararnn.SolverOptions(compile_cell=1)


def test_forward_mode_ad_under_compile_still_specialises_rows():
    """The premise of solver.compile.warn_jvp_recompiles: dynamo specialises the row count of a
    torch.func.jvp even under dynamic=True, so a jvp-Jacobian cell's compiled evaluation compiles per
    shape. If a torch release lifts this, this test fails: then drop the warning (and the README note)."""
    from torch._dynamo.utils import counters

    def f(h, e):
        return torch.func.jvp(lambda x: torch.sigmoid(2.0 * x), (h,), (e,))

    compiled = torch.compile(f, dynamic=True, backend="eager")
    before = counters["stats"]["unique_graphs"]
    for n in (20, 33, 47):
        h = torch.randn(n, 4)
        out = compiled(h, torch.ones_like(h))
        torch.testing.assert_close(out[1], torch.sigmoid(2 * h) * (1 - torch.sigmoid(2 * h)) * 2)
    assert counters["stats"]["unique_graphs"] - before == 3


def test_each_cell_class_has_its_own_recompile_budget(monkeypatch):
    """A cell whose variants used up the recompile budget must not push the next cell class's
    compiled evaluation into eager mode (dynamo's budget is per code object, and every cell's
    evaluation used to share evaluate_piece's). Budget 3 here: cell A at two state sizes needs 4
    evaluation graphs (its first-check and full variants) and runs past it; cell B, evaluated
    after it, needs 2 and must trace both under torch.compile."""
    from pararnn.models import ParaGRU
    from pararnn.solver import compile as solver_compile

    monkeypatch.setattr(solver_compile, "RECOMPILE_LIMIT", 3)  # (not monkeypatch for dynamo's config: its undo
    # deletes attributes missing from the module's __dict__, which hides a torch config entry)

    class Counting(ParaGRU):
        eager_calls: int  # evaluations that ran eagerly (under torch.compile the branch is traced away)

        def step_jacobian_and_scale(self, h, u):
            if not torch.compiler.is_compiling():
                type(self).eager_calls += 1
            return super().step_jacobian_and_scale(h, u)

    class A(Counting):
        eager_calls = 0

    class B(Counting):
        eager_calls = 0

    torch.manual_seed(0)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=3):
        for d in (4, 6):  # check_cell off: its probes call the cell eagerly
            pararnn.RNN(A(3, d), compile_cell=True, check_cell=False)(torch.randn(2, 12, 3))
        pararnn.RNN(B(3, 5), compile_cell=True, check_cell=False)(torch.randn(2, 12, 3))
    assert A.eager_calls > 0  # A did run past its budget (else this test shows nothing)
    assert B.eager_calls == 0
