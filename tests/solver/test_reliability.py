"""Reliability: divergence is never silent, fuzzing against sequential, determinism, long sequences."""
import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pararnn
from pararnn.structure import Block, as_structure


class Logistic(pararnn.Cell):
    """h' = r h (1 - h) + 0.01 tanh(u): periodic for r = 3.2, chaotic for r = 3.9; unbounded f."""

    structure = "diagonal"

    def __init__(self, d, r):
        super().__init__()
        self.state_size, self.r = d, r

    def step(self, h, u):
        return self.r * h * (1 - h) + 0.01 * torch.tanh(u)


def run(cell, x, h0, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pararnn.ConvergenceWarning)
        return pararnn.RNN(cell, on_fail="warn", **kw)(x, h0, return_info=True)


def inputs(B, T, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(B, T, d, generator=g, dtype=torch.float64),
            torch.full((B, d), 0.3, dtype=torch.float64))


@pytest.mark.parametrize("T", [100, 1000])
def test_safeguard_converges_where_plain_newton_diverges(T):
    cell = Logistic(4, 3.2)
    x, h0 = inputs(2, T, 4)
    ref, _ = pararnn.RNN(cell, mode="sequential")(x, h0)
    y, _, info = run(cell, x, h0, max_iters=T, safeguard=False)
    assert not info.all_converged  # plain Newton blows up (to inf/NaN) ...
    assert not torch.isfinite(y).all()
    y, _, info = run(cell, x, h0, max_iters=T)  # ... the safeguarded one converges
    assert info.all_converged and info.safeguarded
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-10


def test_safeguard_trust_region_converges_where_clipped_jacobians_do_not():
    """Dense Elman, spectral radius 1.5: plain Newton blows up; the safeguard's trust region (exact
    Jacobians, bounded updates) converges in a few steps, clipped Jacobians do not in 60."""
    from pararnn.models import Elman

    torch.manual_seed(0)
    cell = Elman(32, 32)
    with torch.no_grad():
        W = torch.randn(32, 32) / 32**0.5
        cell.weight_hh.copy_(W * (1.5 / torch.linalg.eigvals(W).abs().max()))
    cell.double()
    x = torch.randn(2, 1024, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, _ = pararnn.RNN(cell, mode="sequential")(x)
    y, _, info = run(cell, x, None, max_iters=60, shooting=None)  # Newton alone: no shooting sweeps
    assert info.all_converged and info.safeguarded and info.iterations <= 20 and info.sweeps == 0
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-10
    _, _, clipped = run(cell, x, None, max_iters=60, jacobian_clip=0.9, safeguard=False, shooting=None)
    assert not clipped.all_converged


def test_trust_region_bounds_the_update_and_cuts_overflow():
    from pararnn.solver.options import SolverOptions
    from pararnn.solver.safeguard import TRUST_RADIUS, StepPolicy

    st = as_structure("diagonal")
    pol = StepPolicy(SolverOptions(), st, atol=0.0)
    H = torch.tensor([[[0.5, -2.0], [0.1, 1.0]], [[0.3, 0.3], [0.3, 0.3]]])  # [B=2, T=2, d=2]
    r = torch.tensor([[[0.5, 0.0], [0.0, -4.0]], [[0.0, 0.0], [0.0, 0.0]]])  # f = H + r
    pol.keep_previous(H.clone())
    pol.record(torch.ones(2), H)
    blown = pol.blown(torch.tensor([float("nan"), 1.0]))
    assert blown.tolist() == [True, False]  # sequence 0 blew up
    pol.restore(blown, H)
    delta = torch.tensor([[[10.0, float("inf")], [float("nan"), -0.1]], [[5.0, 5.0], [5.0, 5.0]]])
    pol.limit(delta, H, r)
    # sequence 0's rows have size max_t max(|h|, |f|) = (1.0, 3.0): updates cut to that, NaN -> 0
    expect = TRUST_RADIUS * torch.tensor([[1.0, 3.0], [0.0, -0.1]])
    torch.testing.assert_close(delta[0], expect)
    assert torch.equal(delta[1], torch.full((2, 2), 5.0))  # the other sequence is untouched
    # every sequence in the trust region: the in-place path gives the same bounded update
    pol1 = StepPolicy(SolverOptions(), st, atol=0.0)
    H1 = H[:1].clone()
    pol1.keep_previous(H1.clone())
    pol1.record(torch.ones(1), H1)
    pol1.restore(pol1.blown(torch.tensor([float("nan")])), H1)
    delta1 = torch.tensor([[[10.0, float("inf")], [float("nan"), -0.1]]])
    pol1.limit(delta1, H1, r[:1])
    torch.testing.assert_close(delta1[0], expect)


def test_chaotic_cell_is_never_labelled_converged_when_wrong():
    """Newton alone cannot solve the chaotic logistic map: it must say so. With shooting sweeps (the
    default; T/L = 4 windows here) the sweeps carry the exact trajectory window by window, and it
    converges, to the loop's answer; with fewer steps allowed than windows it cannot."""
    cell = Logistic(4, 3.9)
    x, h0 = inputs(3, 1000, 4)
    ref, _ = pararnn.RNN(cell, mode="sequential")(x, h0)
    for kw in (dict(max_iters=50), dict(max_iters=50, shooting=None),
               dict(max_iters=50, jacobian_clip=1.0, safeguard=False, shooting=None),
               dict(max_iters=50, safeguard=False, shooting=None), dict(max_iters=3)):
        y, _, info = run(cell, x, h0, **kw)
        for b in range(3):
            if info.converged[b]:
                assert (y[b] - ref[b]).abs().max() < 1e-6, kw
        if kw.get("shooting", "auto") is None or kw["max_iters"] < 1000 // 250:
            assert not info.all_converged, kw
        else:
            # windows 250, 250, 500, 1000: the fourth sweep at the latest is the loop itself
            assert info.all_converged and 0 < info.sweeps <= 4, kw


def test_jacobian_clip_is_a_convergent_quasi_newton():
    cell = Logistic(3, 3.2)
    x, h0 = inputs(2, 200, 3)
    ref, _ = pararnn.RNN(cell, mode="sequential")(x, h0)
    y, _, info = run(cell, x, h0, max_iters=200, jacobian_clip=0.9, safeguard=False)
    assert info.all_converged and (y - ref).abs().max() < 1e-10


def test_fallback_fixes_only_the_divergent_sequences():
    cell = Logistic(2, 3.9)
    x, h0 = inputs(3, 300, 2)
    h0[0] = 0.0
    x[0] = 0.0  # h stays exactly 0: converges at once
    with pytest.warns(pararnn.ConvergenceWarning, match="recomputed sequentially"):  # plain Newton fails there
        y, _, info = pararnn.RNN(cell, max_iters=5, shooting=None)(x, h0, return_info=True)
    assert info.fell_back.tolist() == [False, True, True]
    ref, _ = pararnn.RNN(cell, mode="sequential")(x, h0)
    assert torch.equal(y, ref)
    # with multiple shooting the windows grow to all of T within the 5 steps: no fallback, the loop's answer
    y, _, info = pararnn.RNN(cell, max_iters=5)(x, h0, return_info=True)
    assert info.all_converged and not info.fell_back.any() and info.sweeps > 0
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)


def test_diagnose_lyapunov():
    x, h0 = inputs(2, 2000, 3)
    chaotic = pararnn.diagnose(Logistic(3, 3.9), x, h0)
    periodic = pararnn.diagnose(Logistic(3, 3.2), x, h0)
    assert chaotic.lyapunov > 0.2 and not chaotic.predictable and "chaotic" in chaotic.advice
    assert periodic.lyapunov < 0 and periodic.predictable
    # Benettin's method on the same dynamics declared dense agrees with the exact diagonal formula
    dense = Logistic(3, 3.9)
    dense.structure = "dense"
    est = pararnn.diagnose(dense, x, h0)
    assert abs(est.lyapunov - chaotic.lyapunov) < 0.05


# ---------------------------------------------------------------- property-based fuzzing
class RandomCell(pararnn.Cell):
    """h' = tanh(scale · (M ⊙ mask) h + u) (+ a gated variant), mask matching the structure."""

    def __init__(self, d, structure, scale, gated, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.state_size, self.input_size = d, d
        self.structure = structure
        st_ = as_structure(structure, d)
        mask = st_.to_dense(torch.ones(st_.storage_shape(d)), d)  # the structure's 0/1 pattern
        self.register_buffer("W", scale * mask * torch.randn(d, d, generator=g) / d**0.5)
        self.gated = gated

    def step(self, h, u):
        c = torch.tanh(h @ self.W.T + u)
        if self.gated:
            z = torch.sigmoid(u)
            return (1 - z) * h + z * c
        return c


@st.composite
def cases(draw):
    d = draw(st.integers(1, 6))
    kinds = ["diagonal", "dense"] + [Block(k) for k in range(2, d + 1) if d % k == 0]
    return dict(
        d=d, structure=draw(st.sampled_from(kinds)), B=draw(st.integers(1, 3)), T=draw(st.integers(1, 40)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])), with_h0=draw(st.booleans()),
        scale=draw(st.floats(0.1, 2.0)), gated=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
        max_iters=draw(st.sampled_from([3, 30])),
    )


def _solve_both(c):
    cell = RandomCell(c["d"], c["structure"], c["scale"], c["gated"], c["seed"]).to(c["dtype"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    x = torch.randn(c["B"], c["T"], c["d"], generator=g, dtype=torch.float64).to(c["dtype"])
    h0 = torch.randn(c["B"], c["d"], generator=g, dtype=torch.float64).to(c["dtype"]) if c["with_h0"] else None
    y, _, info = run(cell, x, h0, max_iters=c["max_iters"])
    ys, _ = pararnn.RNN(cell, mode="sequential")(x, h0)
    return cell, x, h0, y, ys, info


@settings(max_examples=200, deadline=None, derandomize=True)
@given(cases())
def test_fuzz_parallel_equals_sequential_or_reports(c):
    _, _, _, y, ys, info = _solve_both(c)
    # errors can be amplified along T by up to scale^T by the dynamics themselves
    tol = (1e-9 if c["dtype"] == torch.float64 else 1e-4) * max(1.0, c["scale"]) ** c["T"]
    for b in range(c["B"]):
        if bool(info.converged[b]):
            err = ((y[b] - ys[b]).abs().max() / ys[b].abs().max().clamp_min(1e-3)).item()
            assert err < tol, (c, err)
    if c["max_iters"] >= c["T"]:  # Newton is exact after T steps: it must have converged
        assert info.all_converged, c


class ScaledCell(pararnn.Cell):
    """``s · inner(h / s, u)`` with per-entry scales s ``[d]``: the same dynamics at any state size."""

    def __init__(self, inner, s):
        super().__init__()
        self.inner, self.state_size, self.structure = inner, inner.state_size, inner.structure
        self.register_buffer("s", s)

    def step(self, h, u):
        return self.s * self.inner.step(h / self.s, u)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(cases(), st.sampled_from([1e-12, 1e-6, 1e6, "mixed"]))
def test_fuzz_state_scale(c, scale):
    """States from 1e-12 to 1e6, or 1e6 and O(1) entries in one state: every entry reaches the
    dtype's relative accuracy, or the solve reports non-convergence."""
    c = dict(c, scale=min(c["scale"], 0.9), max_iters=30)
    if scale == 1e-12 and c["dtype"] == torch.float32:
        scale = 1e-30  # fp32's range: as small relative to its normal range as 1e-12 in fp64 tests
    s = torch.full((c["d"],), float(scale)) if scale != "mixed" else torch.tensor([1e6, 1.0] * 3)[:c["d"]]
    inner = RandomCell(c["d"], c["structure"], c["scale"], c["gated"], c["seed"])
    cell = ScaledCell(copy.deepcopy(inner), s).to(c["dtype"])
    g = torch.Generator().manual_seed(c["seed"] + 1)
    x = torch.randn(c["B"], c["T"], c["d"], generator=g, dtype=torch.float64)
    ys = pararnn.RNN(ScaledCell(inner, s).double(), mode="sequential")(x)[0]
    y, _, info = run(cell, x.to(c["dtype"]), None, max_iters=30)
    tol = 1e-9 if c["dtype"] == torch.float64 else 1e-4
    for b in range(c["B"]):
        if bool(info.converged[b]):
            err = ((y[b].double() - ys[b]).abs() / ys[b].abs().amax(0).clamp_min(1e-300)).amax().item()
            assert err < tol, (c, scale, err)  # relative per entry (per column of the state)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cases(), st.booleans())
def test_fuzz_structure_probe(c, narrower):
    """The automatic probe passes every correctly declared cell and refuses a too-narrow declaration."""
    cell = RandomCell(c["d"], c["structure"], max(c["scale"], 0.5), c["gated"], c["seed"]).double()
    x = torch.randn(c["B"], c["T"], c["d"], dtype=torch.float64, generator=torch.Generator().manual_seed(c["seed"]))
    if narrower and not isinstance(as_structure(c["structure"], c["d"]), pararnn.Diagonal) and c["d"] > 1:
        cell.structure = "diagonal"
        with pytest.raises(ValueError, match="declares structure diagonal"):
            pararnn.RNN(cell)(x)
    else:
        pararnn.RNN(cell)(x)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(cases())
def test_fuzz_gradients(c):
    c = dict(c, dtype=torch.float64, max_iters=60)
    cell = RandomCell(c["d"], c["structure"], min(c["scale"], 1.0), c["gated"], c["seed"]).double()
    g = torch.Generator().manual_seed(c["seed"] + 1)
    x = torch.randn(c["B"], c["T"], c["d"], generator=g, dtype=torch.float64, requires_grad=True)
    grads = []
    for mode in ("parallel", "sequential"):
        y, _ = pararnn.RNN(cell, mode=mode)(x)
        grads.append(torch.autograd.grad((y * y.detach().sin()).sum(), [x])[0])
    assert ((grads[0] - grads[1]).abs().max() / grads[1].abs().max().clamp_min(1e-6)).item() < 1e-8


# ---------------------------------------------------------------- determinism and long sequences
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_same_seed_same_bits(mode):
    from pararnn.models import SequenceModel

    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = SequenceModel(9, 3, d_model=16, n_layers=2, cell="paralstm", mode=mode)
        tokens = torch.randint(0, 9, (3, 50))
        out, _ = model(tokens)
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


def test_million_steps_forward_and_backward():
    """T = 10^6, d = 64, B = 1 (diagonal cell): works, converges, and agrees with sequential."""
    from pararnn.models import ParaGRU

    torch.manual_seed(0)
    cell = ParaGRU(8, 64)
    x = torch.randn(1, 10**6, 8, requires_grad=True)
    y, hT, info = pararnn.RNN(cell)(x, return_info=True)
    assert info.all_converged and y.shape == (1, 10**6, 64)
    (y[:, ::1000].sum() + hT.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(cell.a.grad).all()
    # the prefix and the tail (restarted from the parallel state) against the sequential loop
    seq = pararnn.RNN(cell, mode="sequential")
    with torch.no_grad():
        head, _ = seq(x[:, :2000])
        tail, _ = seq(x[:, -2000:], y[:, -2001])
    assert (head - y[:, :2000]).abs().max() < 1e-5 and (tail - y[:, -2000:]).abs().max() < 1e-5


@pytest.mark.parametrize("a_std, max_iters, shooting, falls_back",
                         [(0.5, 30, "auto", False), (1.5, 30, "auto", False), (3.0, 30, "auto", False),
                          (3.0, 30, None, True), (3.0, 2, "auto", True)])
def test_diagnose_predicts_what_the_parallel_solve_does(a_std, max_iters, shooting, falls_back):
    from pararnn.models import ParaGRU

    torch.manual_seed(0)
    cell = ParaGRU(16, 16)
    with torch.no_grad():
        cell.a.normal_(0, a_std)
    x = torch.randn(2, 512, 16)
    est = pararnn.diagnose(cell, x, max_iters=max_iters, shooting=shooting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, info = pararnn.RNN(cell, max_iters=max_iters, shooting=shooting)(x, return_info=True)
    assert est.will_fall_back == bool(info.fell_back.any()) == falls_back  # both branches are exercised
    if not est.will_fall_back:
        assert est.newton_iterations == info.iterations and f"took {info.iterations} Newton steps" in est.advice
        assert est.sweeps == info.sweeps and (f"{info.sweeps} multiple-shooting sweeps" in est.advice) == (info.sweeps > 0)
    else:
        assert "will fall back" in est.advice
