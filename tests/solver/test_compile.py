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
def test_a_torch_compiled_module_keeps_the_fused_evaluation(monkeypatch):
    """compile_cell="auto" is decided while dynamo traces the module around the solve: it must give
    the same answer as eagerly (it gave False there, so a torch.compile'd model solved eagerly,
    2.6x slower). The pieces the solve asks for are recorded (and run eagerly: this tests the
    decision, not inductor)."""
    from pararnn.models import ParaGRU
    from pararnn.solver import evaluate as ev

    asked = []
    monkeypatch.setattr(ev, "compiled_piece", lambda fn, cell=None: asked.append(fn.__name__) or fn)
    torch.manual_seed(0)
    rnn = pararnn.RNN(ParaGRU(4, 64), mode="parallel")  # 1 x 1100 x 64 state elements: above the auto floor
    x = torch.randn(1, 1100, 4)
    with torch.no_grad():
        y = torch.compile(rnn)(x)[0]
        assert "evaluate_piece" in asked, asked
        torch.testing.assert_close(y, rnn(x)[0])


def test_compiled_evaluation_matches_the_eager_twin_and_compiles_once_for_every_T():
    """solver.evaluate.evaluate(compiled=True) (torch.compile of evaluate_piece) against the eager twin:
    residuals, Jacobians and the per-sequence reductions, with a padding mask; then a solve with
    compile_cell=True equals the eager solve (values and gradients), and new T and B reuse the
    compiled graph."""
    from torch._dynamo.utils import counters

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
    eager = pararnn.RNN(cell, mode="parallel", compile_cell=False)
    comp = pararnn.RNN(cell, mode="parallel", compile_cell=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (ye, he), (yc, hc) = eager(x), comp(x)
    assert not [str(w.message) for w in caught if "pararnn" in str(w.message)]
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
    """The premise of solver.compile.traced_jacobian: dynamo specialises the row count of a
    torch.func.jvp even under dynamic=True, so an autodiff cell's compiled evaluation would compile
    per shape. If a torch release lifts this, this test fails: then the traced reverse-mode graph
    may give way to the cell's own jvp."""
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
    evaluation used to share evaluate_piece's). Budget 1 here: cell A at two state sizes needs 2
    evaluation graphs and runs past it; cell B, evaluated after it, needs 1 and must trace it
    under torch.compile."""
    from pararnn.models import ParaGRU
    from pararnn.solver import compile as solver_compile

    monkeypatch.setattr(solver_compile, "RECOMPILE_LIMIT", 1)  # (not monkeypatch for dynamo's config: its undo
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
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        for d in (4, 6):  # check_cell off: its probes call the cell eagerly
            pararnn.RNN(A(3, d), compile_cell=True, check_cell=False)(torch.randn(2, 12, 3))
        pararnn.RNN(B(3, 5), compile_cell=True, check_cell=False)(torch.randn(2, 12, 3))
    assert A.eager_calls > 0  # A did run past its budget (else this test shows nothing)
    assert B.eager_calls == 0


# ------------------------------------------------------------------ a user's own cell, compiled by default
class StepOnlyGRU(pararnn.Cell):
    """A diagonal GRU-like cell written with ``step`` only (its Jacobian by autodiff)."""

    def __init__(self, d_in, d, structure="diagonal"):
        super().__init__()
        self.state_size, self.input_size, self.structure = d, d_in, structure
        self.inp = torch.nn.Linear(d_in, 3 * d)
        self.a = torch.nn.Parameter(torch.rand(3, d))
        self.mix = torch.nn.Parameter(0.3 * torch.randn(d, d) / d ** 0.5) if structure != "diagonal" else None
        self.scale = 0.9  # a plain attribute: a constant of the traced graph

    def prepare(self, x):
        return self.inp(x)

    def step(self, h, u):
        uz, ur, uc = u.chunk(3, -1)
        hh = h if self.mix is None else h @ self._masked_mix().T
        z = torch.sigmoid(uz + self.a[0] * h)
        r = torch.sigmoid(ur + self.a[1] * h)
        c = torch.tanh(uc + self.a[2] * r * hh)
        return self.scale * ((1 - z) * h + z * c)

    def _masked_mix(self):
        st = self.get_structure()
        return st.to_dense(st.from_dense(self.mix.expand(1, *self.mix.shape)), self.state_size)[0]


@pytest.mark.parametrize("structure", ["diagonal", pararnn.Block(2), "dense"])
def test_traced_jacobian_equals_the_jvp_one(structure):
    """The reverse-mode graph (rows of J by vjp, transposed into storage form) gives the cell's own
    f and J, at row counts other than the one it was traced at."""
    from pararnn.cell import autodiff_step_and_jacobian
    from pararnn.solver.compile import traced_jacobian

    torch.manual_seed(0)
    cell = StepOnlyGRU(3, 6, structure)
    for n in (5, 40):
        h, u = torch.randn(n, 6), torch.randn(n, 18)
        graph, tensors = traced_jacobian(cell, h, u)
        f, J, _ = graph(tensors, h, u)
        f_ref, J_ref = autodiff_step_and_jacobian(cell.step, h, u, cell.get_structure())
        torch.testing.assert_close(f, f_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(J, J_ref, rtol=1e-5, atol=1e-6)
    cell.scale = 0.5  # a changed attribute is a new graph
    graph2 = traced_jacobian(cell, h, u)[0]
    assert graph2 is not graph
    cell.offset = torch.zeros(6)  # a plain tensor attribute (not a buffer) is a constant of the graph:
    graph3 = traced_jacobian(cell, h, u)[0]
    cell.offset.add_(1.0)  # updated in place, it traces again
    assert traced_jacobian(cell, h, u)[0] is not graph3 and traced_jacobian(cell, h, u)[0] is not graph2


def test_the_traced_graph_gives_the_rounding_scale_of_the_last_sum():
    """A traced step that ends in a sum (here 0.9 · ((1 - z) h + z c)) returns that sum's triangle
    bound as f's rounding scale, s = 0.9 · ((1 - z)|h| + z|c|), which the compiled evaluation's
    convergence test reads (and turns on the solver's correction check); one that does not end
    in a sum returns f and J only."""
    from helpers import DiagTanh

    from pararnn.solver.compile import traced_jacobian

    torch.manual_seed(0)
    cell = StepOnlyGRU(3, 6)
    h, u = torch.randn(40, 6), torch.randn(40, 18)
    graph, tensors = traced_jacobian(cell, h, u)
    assert graph.gives_scale
    f, J, s = graph(tensors, h, u)
    with torch.no_grad():
        uz, ur, uc = u.chunk(3, -1)
        z = torch.sigmoid(uz + cell.a[0] * h)
        c = torch.tanh(uc + cell.a[2] * torch.sigmoid(ur + cell.a[1] * h) * h)
        torch.testing.assert_close(s, 0.9 * ((1 - z) * h.abs() + z * c.abs()))
        torch.testing.assert_close(f, 0.9 * ((1 - z) * h + z * c))

    graph, tensors = traced_jacobian(DiagTanh(6), h, h)
    assert not graph.gives_scale and len(graph(tensors, h, h)) == 2


def test_step_only_cell_compiles_once_for_every_shape():
    """A user's cell with only ``step``, compiled: equal to the eager solve (values and gradients),
    with no warning, and new B and T after the first of each kind of piece reuse the graphs."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cell = StepOnlyGRU(4, 5)
    comp = pararnn.RNN(cell, compile_cell=True, eval_chunk=64)
    eager = pararnn.RNN(cell, compile_cell=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="pararnn")
        for B, T in [(2, 30), (1, 20), (2, 70), (1, 90)]:  # every kind of piece once
            comp(torch.randn(B, T, 4, requires_grad=True))[0].sum().backward()
        graphs = counters["stats"]["unique_graphs"]
        for B, T in [(3, 41), (1, 33), (4, 77), (1, 150)]:
            x = torch.randn(B, T, 4, requires_grad=True)
            yc, hc = comp(x)
            ye, he = eager(x)
            torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
            gc = torch.autograd.grad(yc.sum(), [x, *cell.parameters()])
            ge = torch.autograd.grad(ye.sum(), [x, *cell.parameters()])
            for a, b in zip(ge, gc):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs, "a new B or T recompiled a step-only cell"


def test_untraceable_step_runs_eagerly_with_one_warning():
    """A step with data-dependent Python control flow cannot be traced with symbolic rows: the
    solve runs eagerly (the same numbers) and says so once."""

    class Branchy(StepOnlyGRU):
        def step(self, h, u):
            out = super().step(h, u)
            return out if bool(out.sum() > -1e9) else -out

    torch.manual_seed(0)
    cell = Branchy(3, 4)
    x = torch.randn(2, 25, 3)
    with pytest.warns(UserWarning, match="could not be traced") as record:
        y = pararnn.RNN(cell, compile_cell=True)(x)[0]
        pararnn.RNN(cell, compile_cell=True)(x)
    assert sum("could not be traced" in str(w.message) for w in record) == 1
    torch.testing.assert_close(y, pararnn.RNN(cell, compile_cell=False)(x)[0])


def test_a_traced_jacobian_takes_one_step_of_several_rows():
    """A piece of one time step and several rows (T = 1, or a one-step last chunk) hands the
    traced graph rows that are not contiguous; its reshapes, traced on contiguous rows, are
    views: it raised "view size is not compatible" (Block(2) user cell, compile_cell=True)."""
    from helpers import loop, make_cell

    cell = make_cell("block2", din=4, d=6)
    for T, options in ((1, {}), (65, {"chunk_size": 64})):
        x = torch.randn(3, T, 4, dtype=torch.float64, requires_grad=True)
        y, h = pararnn.RNN(cell, mode="parallel", compile_cell=True, **options)(x)
        y_ref, h_ref = loop(cell, x, torch.zeros(3, 6, dtype=torch.float64))
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        got = torch.autograd.grad(y.sum() + h.sum(), [x, *cell.parameters()])
        want = torch.autograd.grad(y_ref.sum() + h_ref.sum(), [x, *cell.parameters()])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_trace_thread_keeps_the_default_device_and_raises_here():
    from pararnn.solver.compile import in_own_thread

    before = torch.get_default_device()
    try:
        torch.set_default_device("meta")  # per thread: a new thread would start on the CPU
        assert in_own_thread(lambda: torch.zeros(1).device).type == "meta"
    finally:
        torch.set_default_device(before)
    with pytest.raises(ZeroDivisionError):
        in_own_thread(lambda: 1 / 0)


@pytest.mark.parametrize("where", ["chunk_size", "user_checkpoint", "save_on_cpu", "detect_anomaly"])
def test_a_first_trace_under_saved_tensor_hooks_keeps_the_compiled_evaluation(where):
    """The Jacobian graph first asked for inside an activation checkpoint (chunk_size's, or the
    user's), save_on_cpu (torch.func refuses saved-tensor hooks) or anomaly detection: the trace
    failed there and the cell class lost its compiled evaluation for good, with a warning that
    blamed its step."""
    from torch.utils.checkpoint import checkpoint

    from pararnn.solver.compile import _TRACED

    class FreshCell(StepOnlyGRU):  # a class of its own: nothing traced for it yet
        pass

    torch.manual_seed(0)
    cell = FreshCell(3, 4, structure=pararnn.Block(2))
    x = torch.randn(2, 40, 3, requires_grad=True)
    rnn = pararnn.RNN(cell, mode="parallel", compile_cell=True, chunk_size=16 if where == "chunk_size" else None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if where == "user_checkpoint":
            y = checkpoint(lambda x: rnn(x)[0], x, use_reentrant=False)
        elif where == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                y = rnn(x)[0]
        elif where == "detect_anomaly":  # its NaN checks are data-dependent branches: untraceable
            with torch.autograd.detect_anomaly(check_nan=True):
                y = rnn(x)[0]
        else:
            y = rnn(x)[0]
        y.sum().backward()
    assert not [w for w in record if "could not be traced" in str(w.message)]
    traced = [g for key, g in _TRACED.items() if key[0] is FreshCell]
    assert traced and all(g is not None for g in traced)
    torch.testing.assert_close(y, pararnn.RNN(cell, mode="sequential")(x)[0], rtol=1e-5, atol=1e-6)


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    """Where inductor cannot compile (here: its backend raises), the cell class runs eagerly from
    then on, with one warning and the eager twin's numbers; an error of the cell itself still raises."""
    from pararnn import fastmath
    from pararnn.models import ParaGRU

    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fastmath, "compile_backend", broken)

    class Fresh(ParaGRU):  # a class of its own: a new compiled entry, made with the broken backend
        pass

    torch.manual_seed(0)
    cell = Fresh(3, 4)
    x = torch.randn(2, 25, 3, requires_grad=True)
    with pytest.warns(UserWarning, match="no C.. compiler") as record:
        y = pararnn.RNN(cell, compile_cell=True)(x)[0]
        y.sum().backward()
        pararnn.RNN(cell, compile_cell=True)(x)
    assert sum("compiling the evaluation" in str(w.message) for w in record) == 1
    torch.testing.assert_close(y, pararnn.RNN(cell, compile_cell=False)(x)[0])


def test_auto_compiles_large_real_cpu_solves_only():
    from pararnn.models import ParaGRU
    from pararnn.solver.compile import AUTO_COMPILE_ELEMENTS, use_compiled

    cell = ParaGRU(3, 64)
    h0 = torch.zeros(2, 64)
    big = AUTO_COMPILE_ELEMENTS // (2 * 64)
    assert use_compiled("auto", cell, h0, 2, big)
    assert not use_compiled("auto", cell, h0, 2, big - 1)
    assert not use_compiled("auto", cell, h0.to(torch.complex64), 2, big)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_compiled("auto", cell, h0, 2, big)
    assert use_compiled(True, cell, h0, 1, 1) and not use_compiled(False, cell, h0, 2, big)
    assert pararnn.SolverOptions().compile_cell == "auto"


def test_auto_leaves_hand_written_unshared_blocks_eager():
    """compile_cell="auto" does not compile a hand-written Block(k) Jacobian (its fused CPU loop is
    scalar: strided loads and stores), but does its autodiff twin and shared blocks (DeltaNet)."""
    from pararnn.models import DeltaNet, ParaLSTM
    from pararnn.solver.compile import AUTO_COMPILE_ELEMENTS, fusion_pays, use_compiled
    from pararnn_studies.bench import autodiff_twin

    lstm, twin, delta = ParaLSTM(3, 32), autodiff_twin(ParaLSTM)(3, 32), DeltaNet(8, 2, 4)
    assert autodiff_twin(ParaLSTM) is type(twin)  # one class: its compiled graphs are reused
    assert not fusion_pays(lstm) and fusion_pays(twin) and fusion_pays(delta)
    h0 = torch.zeros(2, 64)
    big = AUTO_COMPILE_ELEMENTS // (2 * 64)
    assert not use_compiled("auto", lstm, h0, 2, big) and use_compiled("auto", twin, h0, 2, big)
    assert use_compiled(True, lstm, h0, 2, big)  # asked for: compiled
    x = torch.randn(2, 64, 3)
    with torch.no_grad():
        y = pararnn.RNN(lstm, mode="parallel")(x)[0]
    torch.testing.assert_close(y, pararnn.RNN(lstm, mode="sequential")(x)[0])


def test_a_hard_cell_converges_compiled_as_eagerly():
    """ParaGRU with recurrent vectors of std 2.0 (latches) needs multiple-shooting sweeps, which run
    the cell eagerly. The compiled evaluation rounds differently, so its checks saw the swept
    windows a few ulp off, and latches amplified that step after step (B = 8, d = 256: 30 Newton
    steps and a fallback, against 5 eagerly). After a sweep the solve evaluates eagerly: the same
    steps and sweeps as the eager solve, and its answer."""
    from pararnn.models import ParaGRU

    torch.manual_seed(0)
    cell = ParaGRU(64, 64)
    with torch.no_grad():
        cell.a.normal_(0, 2.0)
    x = torch.randn(4, 4096, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ye, _, eager = pararnn.RNN(cell, mode="parallel", compile_cell=False)(x, return_info=True)
        yc, _, comp = pararnn.RNN(cell, mode="parallel", compile_cell=True)(x, return_info=True)
    assert eager.sweeps > 0  # the case needs sweeps (else this test shows nothing)
    assert (comp.iterations, comp.sweeps) == (eager.iterations, eager.sweeps)
    assert not comp.fell_back.any()
    torch.testing.assert_close(yc, ye, rtol=0, atol=1e-5)


@pytest.mark.parametrize("own_base", [True, pytest.param(False, marks=pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="the pieces' view base differs by batch: dynamo recompiles"))])
def test_the_graph_carrying_evaluation_compiles_once_for_a_batch_of_one_and_more(own_base, monkeypatch):
    """graph_piece (the evaluation that carries autograd's graph) compiled: its input rows are
    the flattened projected input (a view of a [T, 3d] tensor at batch 1) or, at batch 3, views
    split from a [B, T, 3d] one; split_pieces(own_base=True), which parallel_solve uses, keeps that base out of
    dynamo's guards, so gradients at batch 1 and 3 add one graph in all."""
    from torch._dynamo.utils import counters

    import pararnn.autograd
    from pararnn.models import ParaGRU

    if not own_base:
        split = pararnn.autograd.split_pieces
        monkeypatch.setattr(pararnn.autograd, "split_pieces", lambda x, pieces, own_base=False: split(x, pieces))

    class FreshGRU(ParaGRU):  # a class of its own: its own compiled code and graph count
        def prepare(self, x):  # u as oneDNN's linear gives it: a view of [T, 3d] at batch 1, [B, T, 3d] above
            u = self.proj(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)
            return u if x.shape[0] == 1 else u.clone()

    torch.manual_seed(0)
    cell = FreshGRU(5, 6)
    comp = pararnn.RNN(cell, compile_cell=True, eval_chunk=240)  # graph pieces of one row (40 steps × 6)
    eager = pararnn.RNN(cell, compile_cell=False)
    with torch.no_grad():  # the Newton pieces, at both batches
        for B in (1, 3):
            comp(torch.randn(B, 40, 5))
    before = counters["stats"]["unique_graphs"]
    for B in (1, 3, 1):
        x = torch.randn(B, 40, 5, requires_grad=True)
        gc = torch.autograd.grad(comp(x)[0].sum(), [x, *cell.parameters()])
        ge = torch.autograd.grad(eager(x)[0].sum(), [x, *cell.parameters()])
        for a, b in zip(ge, gc):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] - before == 1, "graph_piece compiled more than once"


def test_autodiff_jacobian_traces_in_one_graph():
    """The autodiff Jacobian asks whether inference mode is on, which dynamo cannot trace: the
    question is skipped while compiling, so a compiled caller keeps one graph."""
    from pararnn.cell import autodiff_step_and_jacobian

    def step(h, u):
        return torch.tanh(0.5 * h + u)

    h, u = torch.randn(3, 4), torch.randn(3, 4)
    compiled = torch.compile(lambda h, u: autodiff_step_and_jacobian(step, h, u, "diagonal"), fullgraph=True)
    torch.testing.assert_close(compiled(h, u)[1], autodiff_step_and_jacobian(step, h, u, "diagonal")[1])
