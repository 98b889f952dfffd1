"""Multiple-shooting sweeps: where Newton stalls on a hard but predictable cell, the solve still converges in parallel."""
import math
import warnings

import pytest
import torch
from helpers import rel_err

import pararnn
from pararnn.solver.fallback import sequential_solve
from pararnn.solver.newton import replay_steps
from pararnn.solver.options import SolverOptions
from pararnn.solver.shooting import shooting_sweep, shooting_window


def hard_gru(a_std: float = 2.0, d: int = 16, seed: int = 0):
    """ParaGRU with recurrent vectors of std a_std: at 2.0 latch-like channels that Newton alone,
    from the default guess, does not settle in 30 steps at T = 1024 (fp64)."""
    from pararnn.models import ParaGRU

    torch.manual_seed(seed)
    cell = ParaGRU(d, d)
    with torch.no_grad():
        cell.a.normal_(0, a_std)
    return cell.double()


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pararnn.ConvergenceWarning)
        return fn(*args, **kw)


@pytest.mark.parametrize("T, L", [(37, 5), (64, 16), (10, 10), (9, 20), (1, 1)])
def test_sweeps_alone_give_the_sequential_solve(T, L):
    """From any iterate, ⌈T/L⌉ sweeps give the loop's states (masked steps hold, the last window may
    be short); a sweep at the solution changes nothing, and fewer sweeps leave the far windows wrong."""
    cell = hard_gru(d=8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, T, 8, dtype=torch.float64, generator=g)
    h0 = torch.randn(3, 8, dtype=torch.float64, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor([T, max(1, T // 2), T])[:, None]  # [3, T]
    with torch.no_grad():
        u = cell.prepare(x)
        ref = sequential_solve(cell.step, u, h0, mask)  # [3, T, 8]
        S = torch.randn(3, T + 1, 8, dtype=torch.float64, generator=g)
        S[:, 0] = h0
        n = math.ceil(T / L)
        for i in range(n):
            if i == n - 1 and T > L:  # one sweep short: the last window started from a wrong state
                assert rel_err(S[:, 1 + (n - 1) * L:], ref[:, (n - 1) * L:]) > 1e-3
            shooting_sweep(cell.step, S, u, L, mask)
        assert rel_err(S[:, 1:], ref) < 1e-14
        before = S.clone()
        shooting_sweep(cell.step, S, u, L, mask)
        assert rel_err(S, before) < 1e-14


def test_shooting_window_option():
    assert shooting_window(None, 4096) is None
    assert shooting_window("auto", 4096) == 256 and shooting_window("auto", 1024) == 256
    assert shooting_window("auto", 1000) == 250 and shooting_window("auto", 3) == 1
    assert shooting_window(100, 50) == 50
    for bad in (0, -3, True, 2.5, "256"):
        with pytest.raises(ValueError, match="shooting"):
            SolverOptions(shooting=bad)


def test_hard_cell_converges_in_parallel_where_newton_alone_falls_back():
    """Values and gradients (exact adjoint at the solution) equal the sequential loop's; Newton alone
    would fall back to the loop."""
    cell = hard_gru()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1024, 16, dtype=torch.float64, generator=g)
    gy = torch.randn(2, 1024, 16, dtype=torch.float64, generator=g)
    _, _, alone = quiet(pararnn.RNN(cell, shooting=None), x, return_info=True)
    assert bool(alone.fell_back.all()) and alone.sweeps == 0 and alone.shooting_window is None
    xs = x.clone().requires_grad_()
    ref, ref_h = pararnn.RNN(cell, mode="sequential")(xs)
    ref_grads = torch.autograd.grad((ref * gy).sum() + ref_h.sum(), [xs, *cell.parameters()])
    xp = x.clone().requires_grad_()
    rnn = pararnn.RNN(cell)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pararnn.ConvergenceWarning)  # no fallback
        y, hT, info = rnn(xp, return_info=True)
    assert info.all_converged and not info.fell_back.any() and info.sweeps > 0 and info.iterations < 30
    assert rel_err(y, ref) < 1e-10 and rel_err(hT, ref_h) < 1e-10
    grads = torch.autograd.grad((y * gy).sum() + hT.sum(), [xp, *cell.parameters()])
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-8
    assert replay_steps(info) is None  # a chunked backward re-solves such a chunk in full
    assert rnn.stats.sweeps == info.sweeps


def test_hard_cell_with_lengths_and_chunks():
    """Sweeps respect padded steps and run inside each time chunk; gradients stay exact."""
    cell = hard_gru()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1024, 16, dtype=torch.float64, generator=g)
    lengths = torch.tensor([1024, 700, 1])
    xs = x.clone().requires_grad_()
    ref, ref_h = pararnn.RNN(cell, mode="sequential")(xs, lengths=lengths)
    ref_g = torch.autograd.grad(ref.sum() + ref_h.sum(), xs)[0]
    for kw in ({}, {"chunk_size": 512}):
        xp = x.clone().requires_grad_()
        y, hT, info = pararnn.RNN(cell, **kw)(xp, lengths=lengths, return_info=True)
        assert info.all_converged and not info.fell_back.any(), kw
        assert max(i.sweeps for i in (info.chunks or [info])) > 0, kw
        assert rel_err(y, ref) < 1e-10 and rel_err(hT, ref_h) < 1e-10, kw
        assert rel_err(torch.autograd.grad(y.sum() + hT.sum(), xp)[0], ref_g) < 1e-8, kw


def test_a_sweep_of_some_sequences_leaves_the_others():
    cell = hard_gru(d=8)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, 8, dtype=torch.float64, generator=g)
    mask = torch.arange(50)[None, :] < torch.tensor([50, 20, 35])[:, None]
    with torch.no_grad():
        u = cell.prepare(x)
        S = torch.randn(3, 51, 8, dtype=torch.float64, generator=g)
        full, part = S.clone(), S.clone()
        shooting_sweep(cell.step, full, u, 16, mask)
        shooting_sweep(cell.step, part, u, 16, mask, rows=torch.tensor([0, 2]))
    assert torch.equal(part[1], S[1])  # untouched
    assert rel_err(part[[0, 2]], full[[0, 2]]) < 1e-14


def test_no_sweep_at_the_rounding_floor():
    """A sequence within ROUNDING_FLOOR·rtol whose max|r| grew (rounding, not a latch) takes
    another Newton step, not a sweep: its q still shrank (a sweep also switches a compiled solve to
    eager evaluation for the rest of it). Far from the floor the stall rule still sweeps."""
    from types import SimpleNamespace

    from pararnn.solver.newton import ROUNDING_FLOOR, NewtonSolver
    from pararnn.solver.options import SolverInfo

    rtol = 2e-6
    solver = SimpleNamespace(rtol=rtol, info=SolverInfo(mode="parallel"), opts=SolverOptions(max_iters=30))
    t = lambda v: torch.tensor([v], dtype=torch.float64)
    prev = (t(1.8e-7), t(13.5 * rtol))
    decision, _ = NewtonSolver.decide(solver, t(2.1e-7), t(1.98 * rtol), prev, undo=False)
    assert not decision.stop and not bool(decision.converged.any())
    assert decision.stalled is None or not bool(decision.stalled.any())
    far = 4 * ROUNDING_FLOOR * rtol  # the same growth of max|r| far from the floor: a sweep
    decision, _ = NewtonSolver.decide(solver, t(2.1e-3), t(far), (t(1.8e-3), t(far)), undo=False)
    assert bool(decision.stalled.all())
