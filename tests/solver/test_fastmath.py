"""pararnn.fastmath: the fast tanh of the compiled pieces against float64 tanh, and its rewrite."""
import math

import pytest
import torch

from pararnn import fastmath
from pararnn.solver.compile import compiled_piece

EPS = torch.finfo(torch.float32).eps  # 2^-23


def _grid():
    """Every decade from the smallest subnormal to 20 (tanh = 1 in fp32 beyond ~9), both signs,
    the split point's neighbours and the specials."""
    pos = torch.logspace(-45, math.log10(20), 400_000, dtype=torch.float64).float()
    split = torch.tensor(fastmath.SPLIT)
    edge = torch.stack([torch.nextafter(split, torch.tensor(0.0)), split, torch.nextafter(split, torch.tensor(1.0))])
    return torch.cat([pos, -pos, edge, -edge])


def _max_rel_err(y: torch.Tensor, x: torch.Tensor) -> float:
    ref = torch.tanh(x.double())
    ok = ref != 0
    return float(((y.double() - ref).abs() / ref.abs())[ok].max())


@pytest.mark.parametrize("compiled", [False, True])
def test_fast_tanh_is_within_two_ulp_of_float64_tanh(compiled):
    x = _grid()
    fn = torch.compile(fastmath.tanh_formula, backend="inductor") if compiled else fastmath.tanh_formula
    err = _max_rel_err(fn(x), x)
    assert err <= 2 * EPS, f"max relative error {err:.3g} > 2 eps"
    # SLEEF's tanh, for scale: the fast one is at most a few times its error
    assert err <= 4 * max(_max_rel_err(torch.tanh(x), x), EPS / 2)


def test_fast_tanh_specials():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e30, -1e30, 1e-45, -1e-45])
    y = fastmath.tanh(x)
    assert y[:2].tolist() == [0.0, 0.0] and not torch.signbit(y[0]) and torch.signbit(y[1])
    assert y[2:4].tolist() == [1.0, -1.0] and torch.isnan(y[4]) and y[5:7].tolist() == [1.0, -1.0]
    assert torch.equal(y[7:], x[7:])  # tanh(x) = x at the subnormals
    assert fastmath.tanh(torch.tensor([3.0], dtype=torch.float64)).dtype == torch.float64


def test_fast_tanh_gradient_is_tanh_derivative():
    """The derivative is 1 - y² from the output (not the approximation's), also under torch.compile,
    and no NaN where the unused branch would overflow (|x| = 1e30)."""
    x = torch.cat([torch.randn(1000) * 3, torch.tensor([1e30, -1e30, 0.0])]).requires_grad_()
    (g,) = torch.autograd.grad(fastmath.tanh(x).sum(), x)
    (ref,) = torch.autograd.grad(torch.tanh(x.double()).sum(), x)
    torch.testing.assert_close(g, ref, rtol=4 * EPS, atol=4 * EPS)
    comp = torch.compile(lambda v: fastmath.tanh(v * 2).sum(), backend="inductor")
    (gc,) = torch.autograd.grad(comp(x), x)
    (ref2,) = torch.autograd.grad(torch.tanh(x.double() * 2).sum(), x)
    torch.testing.assert_close(gc, ref2, rtol=8 * EPS, atol=8 * EPS)


def test_rewrite_replaces_every_tanh_spelling():
    def f(x):
        return torch.tanh(x) + x.tanh() + torch.nn.functional.tanh(x) + torch.nn.Tanh()(x) + torch.sigmoid(x)

    seen = []

    def backend(gm, example_inputs):
        seen.append(fastmath.rewrite_tanh(gm))
        assert not any(n.target in ("tanh", torch.tanh, torch.nn.functional.tanh) for n in gm.graph.nodes)
        return gm

    x = torch.randn(64) * 2
    torch.testing.assert_close(torch.compile(f, backend=backend)(x), f(x), rtol=2 * EPS, atol=4 * EPS)
    assert seen == [4]


def test_compiled_pieces_use_the_fast_tanh(monkeypatch):
    """compiled_piece compiles through fastmath.compile_backend (the rewrite runs on its graph)."""
    calls = []
    rewrite = fastmath.rewrite_tanh
    monkeypatch.setattr(fastmath, "rewrite_tanh", lambda gm: calls.append(rewrite(gm)) or calls[-1])

    def piece(x):
        return torch.tanh(x) * 2

    x = torch.randn(100, 3)
    y = compiled_piece(piece)(x)
    assert calls == [1]
    torch.testing.assert_close(y, 2 * fastmath.tanh_formula(x), rtol=2 * EPS, atol=0)


def test_rewrite_reaches_a_traced_jacobian():
    """A cell with only ``step`` is compiled through its traced step-and-Jacobian graph
    (solver.compile.traced_jacobian), whose ops reach dynamo's graph as aten ops: their tanh is
    rewritten too, and f and J are the fast tanh's and its derivative's."""
    from helpers import DiagTanh

    from pararnn.solver.compile import traced_jacobian

    cell = DiagTanh(8)
    h, u = torch.randn(50, 8) * 2, torch.randn(50, 8) * 2
    graph, tensors = traced_jacobian(cell, h, u)
    seen = []

    def backend(gm, example_inputs):
        seen.append(fastmath.rewrite_tanh(gm))
        assert not [n for n in gm.graph.nodes if n.target in (torch.ops.aten.tanh.default, torch.tanh)], gm.graph
        return gm

    f, J = torch.compile(lambda h, u: graph(tensors, h, u), backend=backend)(h, u)
    assert seen and seen[0] >= 1
    y = fastmath.tanh_formula(cell.w.detach() * h + u)
    torch.testing.assert_close(f, y, rtol=0, atol=0)
    torch.testing.assert_close(J, cell.w.detach() * (1 - y * y), rtol=2 * EPS, atol=4 * EPS)


def test_fast_tanh_under_torch_func():
    """jvp (cells whose Jacobian is a torch.func.jvp), vmap and grad give tanh's derivative."""
    x, t = torch.randn(64) * 2, torch.randn(64)
    y, jt = torch.func.jvp(fastmath.tanh, (x,), (t,))
    d = 1 - torch.tanh(x.double()) ** 2
    torch.testing.assert_close(jt.double(), t.double() * d, rtol=4 * EPS, atol=4 * EPS)
    torch.testing.assert_close(torch.func.vmap(fastmath.tanh)(x.view(8, 8)), torch.tanh(x.view(8, 8)),
                               rtol=2 * EPS, atol=0)
    g = torch.func.grad(lambda v: fastmath.tanh(v).sum())(x)
    torch.testing.assert_close(g.double(), d, rtol=4 * EPS, atol=4 * EPS)


def test_compiled_jvp_cell_matches_eager():
    """A cell whose Jacobian comes from autodiff (ParaLSTM) solved with compile_cell equals the eager solve."""
    import pararnn
    from pararnn.models import ParaLSTM

    torch.manual_seed(0)
    cell = ParaLSTM(4, 3)
    x = torch.randn(2, 30, 4, requires_grad=True)
    ye, _ = pararnn.RNN(cell, mode="parallel", compile_cell=False)(x)
    yc, _ = pararnn.RNN(cell, mode="parallel", compile_cell=True)(x)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ye.sum(), [x, *cell.parameters()]),
                    torch.autograd.grad(yc.sum(), [x, *cell.parameters()])):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_float64_keeps_torch_tanh():
    """The polynomial is a float32 one (1e-9 off in float64): float64 inputs take torch.tanh,
    eagerly and in a compiled graph."""
    from pararnn import fastmath

    x = torch.linspace(-5, 5, 10001, dtype=torch.float64)
    assert torch.equal(fastmath.tanh(x), torch.tanh(x))
    f = torch.compile(lambda t: torch.tanh(t) * 2, backend=fastmath.compile_backend)
    torch.testing.assert_close(f(x), torch.tanh(x) * 2, rtol=1e-14, atol=0)  # the polynomial: 1e-9


def test_the_rewritten_graph_stays_in_the_compile_caches():
    """A graph calling fastmath.tanh is cached by AOT autograd (hit, or missed and saved) rather
    than bypassed: a bypassed graph is traced again in every new process, on every first call of a
    compiled solve."""
    from torch._dynamo.utils import counters

    counters.clear()
    f = torch.compile(lambda x: torch.tanh(x) * 3, backend=fastmath.compile_backend, dynamic=False)
    x = torch.randn(7, 5, requires_grad=True)
    f(x).sum().backward()
    aot = counters["aot_autograd"]
    assert aot["autograd_cache_bypass"] == 0, dict(aot)
    assert aot["autograd_cache_hit"] + aot["autograd_cache_saved"] >= 1, dict(aot)
