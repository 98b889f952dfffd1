"""Trust at the edges: every case here once gave a silent wrong answer, a hang or a crash.

Each test ends in the right answer or a clear error; each fails on the engine before its fix.
"""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import DenseTanh, rel_err

import pararnn
from pararnn.models import ParaGRU
from pararnn.structure import Block


class Scaled(pararnn.Cell):
    """``s·tanh(0.9 h / s + u)``: the same dynamics at every scale s."""

    structure = "diagonal"

    def __init__(self, d, s):
        super().__init__()
        self.state_size, self.s = d, s

    def step(self, h, u):
        return self.s * torch.tanh(0.9 * h / self.s + u)


class Mixed(pararnn.Cell):
    """Entry 0 ~ 1e6 (linear), entry 1 = O(1) (tanh): one state, two scales."""

    structure = "diagonal"
    state_size = 2

    def step(self, h, u):
        return torch.stack([0.99 * h[:, 0] + 1e4 * u[:, 0], torch.tanh(0.5 * h[:, 1] + u[:, 1])], -1)


def _solve(cell, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pararnn.RNN(cell, on_fail="warn", **kw)(x, return_info=True)


# ------------------------------------------------------------------ 1, 2: scale-free tolerance
@pytest.mark.parametrize("dtype, s", [(torch.float32, 1e-6), (torch.float32, 1e-4), (torch.float32, 1e6),
                                      (torch.float64, 1e-12), (torch.float64, 1e6)])
def test_small_and_large_states_reach_relative_accuracy(dtype, s):
    x = torch.randn(2, 300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = pararnn.RNN(Scaled(5, s), mode="sequential")(x)[0]
    y, _, info = _solve(Scaled(5, s), x.to(dtype))
    assert info.iterations >= 1  # the initial guess never passes by being small
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert not info.all_converged or rel_err(y, ref) < tol


def test_mixed_scales_in_one_state():
    x = torch.randn(2, 500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = pararnn.RNN(Mixed(), mode="sequential")(x)[0]
    y, _, info = _solve(Mixed(), x.float())
    assert info.all_converged
    assert rel_err(y[..., 1], ref[..., 1]) < 1e-5  # the O(1) entry is as accurate as alone
    assert rel_err(y[..., 0], ref[..., 0]) < 1e-5


# ------------------------------------------------------------------ 3: double backward
@pytest.mark.parametrize("structure", ["diagonal", Block(2), Block(3, shared=True), "dense"])
def test_linear_scan_gradgradcheck(structure):
    st = pararnn.structure.as_structure(structure, 6)
    g = torch.Generator().manual_seed(0)
    A = (0.5 * torch.randn(2, 5, *st.storage_shape(6), generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    for reverse in (False, True):
        fn = lambda A, b, h0: pararnn.linear_scan(A, b, h0, structure, reverse=reverse)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (A, b, h0))


def test_linear_scan_second_order_equals_the_loop():
    g = torch.Generator().manual_seed(3)
    A = torch.rand(2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    vals = []
    for backend in ("cpu", "reference"):
        h = pararnn.linear_scan(A, b, backend=backend)
        (gA,) = torch.autograd.grad((h ** 2).sum(), A, create_graph=True)
        vals.append(torch.autograd.grad(gA.sum(), b)[0])
    torch.testing.assert_close(vals[0], vals[1])


def test_parallel_rnn_refuses_double_backward():
    cell = ParaGRU(3, 4).double()
    x = torch.randn(2, 20, 3, dtype=torch.float64)
    y, _ = pararnn.RNN(cell)(x)
    with pytest.raises(RuntimeError, match="mode='sequential'"):
        torch.autograd.grad(y.pow(2).sum(), cell.a, create_graph=True)
    torch.autograd.grad(pararnn.RNN(cell)(x)[0].pow(2).sum(), cell.a)  # first order is fine
    y, _ = pararnn.RNN(cell, mode="sequential")(x)  # the documented way works
    (g,) = torch.autograd.grad(y.pow(2).sum(), cell.a, create_graph=True)
    torch.autograd.grad(g.sum(), cell.a)


# ------------------------------------------------------------------ 4: torch.func
def test_torch_func_transforms_raise_clearly():
    cell = ParaGRU(3, 4).double()
    rnn = pararnn.RNN(cell)
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    params = dict(cell.named_parameters())
    loss = lambda p: torch.func.functional_call(rnn, ({f"cell.{k}": v for k, v in p.items()},), (x,))[0].sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(loss)(params)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.vmap(lambda xx: rnn(xx.unsqueeze(0))[0])(x)
    auto = pararnn.RNN(cell, mode="auto")  # auto runs the loop under torch.func, which traces
    g = torch.func.grad(lambda xx: auto(xx)[0].sum())(x)
    g_ref = torch.autograd.grad(pararnn.RNN(cell)(x.requires_grad_())[0].sum(), x)[0]
    torch.testing.assert_close(g, g_ref)


def test_forward_mode_ad_raises_clearly_and_auto_takes_the_loop():
    """Forward-mode AD through a parallel solve (``torch.autograd.forward_ad`` duals): a pararnn
    error naming the way out (it was torch's "Nested forward mode AD is not supported", from the
    probe's own jvp); ``mode="auto"`` runs the loop there, whose tangent is the finite
    difference's."""
    import torch.autograd.forward_ad as fwAD

    cell = ParaGRU(3, 4).double()
    x, v = torch.randn(2, 30, 3, dtype=torch.float64), torch.randn(2, 30, 3, dtype=torch.float64)
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            pararnn.RNN(cell, mode="parallel")(fwAD.make_dual(x, v))
        tangent = fwAD.unpack_dual(pararnn.RNN(cell, mode="auto")(fwAD.make_dual(x, v))[0]).tangent
    seq = pararnn.RNN(cell, mode="sequential")
    eps = 1e-6
    fd = (seq(x + eps * v)[0] - seq(x - eps * v)[0]) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ 5-8: the automatic cell probe
def test_misdeclared_structure_is_caught_on_the_first_parallel_call():
    cell = DenseTanh(3, 6).double()
    cell.structure = "diagonal"
    with pytest.raises(ValueError, match="declares structure diagonal"):
        pararnn.RNN(cell)(torch.randn(2, 20, 3, dtype=torch.float64))


class AbsComplex(pararnn.Cell):
    structure = "diagonal"
    state_size = 3

    def state_dtype(self, u):
        return torch.complex128

    def step(self, h, u):
        return 0.5 * h * torch.exp(-h.abs()) + u


def test_non_holomorphic_complex_cell_is_rejected():
    x = torch.randn(2, 20, 3, dtype=torch.complex128)
    with pytest.raises(ValueError, match="not holomorphic"):
        pararnn.RNN(AbsComplex())(x)
    with pytest.raises(ValueError, match="not holomorphic"):
        pararnn.check_structure(AbsComplex(), u=x[:, 0], h=torch.randn(2, 3, dtype=torch.complex128))


class DropoutCell(pararnn.Cell):
    structure = "diagonal"

    def __init__(self, d):
        super().__init__()
        self.state_size, self.drop = d, torch.nn.Dropout(0.5)

    def step(self, h, u):
        return self.drop(torch.tanh(0.5 * h + u))


def test_random_step_is_rejected():
    with pytest.raises(ValueError, match="not deterministic.*prepare\\(\\) or output\\(\\)"):
        pararnn.RNN(DropoutCell(4))(torch.randn(2, 20, 4))
    pararnn.RNN(DropoutCell(4).eval())(torch.randn(2, 20, 4))  # eval mode is deterministic


class BatchNormed(pararnn.Cell):
    structure = "diagonal"
    state_size = 4

    def step(self, h, u):
        z = torch.tanh(0.5 * h + u)
        return z - z.mean(0, keepdim=True)  # mixes batch rows


def test_step_that_couples_batch_rows_is_rejected():
    with pytest.raises(ValueError, match="couples batch rows"):
        pararnn.RNN(BatchNormed())(torch.randn(3, 20, 4))


def test_probe_runs_once_and_can_be_switched_off(monkeypatch):
    calls = []
    monkeypatch.setattr(pararnn.verify, "verify_cell", lambda *a: calls.append(1))
    cell = ParaGRU(3, 4)
    rnn = pararnn.RNN(cell)
    for _ in range(3):
        rnn(torch.randn(2, 10, 3))
    rnn(torch.randn(2, 10, 3).double().float())
    assert len(calls) == 1
    cell.double()
    rnn(torch.randn(2, 10, 3, dtype=torch.float64))  # another dtype: probed again
    assert len(calls) == 2
    pararnn.RNN(ParaGRU(3, 4), check_cell=False)(torch.randn(2, 10, 3))
    assert len(calls) == 2


# ------------------------------------------------------------------ 9: sequence parallel + sequential
def test_sequential_mode_with_a_process_group_is_refused():
    ctx = pararnn.parallel.ParallelContext()  # any context stands for a group here
    rnn = pararnn.RNN(ParaGRU(3, 4), process_group=ctx)
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match="process_group"):
        rnn(x, mode="sequential")
    y_auto = rnn(x, mode="auto")[0]  # auto picks the parallel solve, which links the chunks
    assert rnn.last_info.mode == "parallel"
    torch.testing.assert_close(y_auto, pararnn.RNN(rnn.cell, mode="sequential")(x)[0])


# ------------------------------------------------------------------ 10: fork after use
def test_fork_pool_after_a_parallel_solve_returns():
    code = textwrap.dedent("""
        import multiprocessing as mp, torch, pararnn, pararnn.runtime
        from pararnn.models import ParaGRU
        pararnn.runtime.fork_safe_workers()  # the documented opt-in for fork after a solve
        torch.manual_seed(0)
        cell, x = ParaGRU(4, 64), torch.randn(2, 300, 4)
        def work(i):
            with torch.no_grad():
                return float(pararnn.RNN(cell)(x)[0].sum())
        ref = work(0)  # the parent uses the compiled scans' thread pool first
        with mp.get_context("fork").Pool(2) as pool:
            out = pool.map(work, range(4))
        assert all(abs(o - ref) < 1e-4 for o in out), (out, ref)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_importing_pararnn_changes_no_process_wide_state():
    """A forked child after `import pararnn` and solves (one of them compiled) has the parent's
    torch threads and numba's threading layer as the user left them (no fork handler is
    registered), and torch's global settings, dynamo's config and the environment (glibc's
    MALLOC_* tunables, OpenMP's and numba's variables) are what they were before the import. One
    torch thread: numba's default count is the core count, and its OpenMP layer set the calling
    thread's OpenMP count (torch's) to it when it started."""
    code = textwrap.dedent("""
        import os, torch, numba, torch._dynamo, torch.fx.experimental._config as fxc
        torch.set_num_threads(1)
        ENV = ('MALLOC_', 'GLIBC_', 'OMP_', 'GOMP_', 'KMP_', 'MKL_', 'NUMBA_', 'PARARNN_')  # (inductor sets its own)
        def settings():
            return (numba.config.THREADING_LAYER, numba.config.NUMBA_NUM_THREADS, torch.get_num_threads(),
                    torch.get_num_interop_threads(), torch.get_default_dtype(), torch.get_float32_matmul_precision(),
                    torch.are_deterministic_algorithms_enabled(), torch._dynamo.config.recompile_limit,
                    fxc.use_duck_shape,
                    {k: v for k, v in os.environ.items() if k.startswith(ENV)})
        before = settings()
        import pararnn, pararnn.models, pararnn.nn, pararnn.kernels.cpu, pararnn.runtime
        pararnn.RNN(pararnn.models.ParaGRU(2, 8))(torch.randn(1, 100, 2))  # the CPU scans ran
        assert torch.get_num_threads() == 1, torch.get_num_threads()
        pararnn.RNN(pararnn.models.ParaGRU(2, 8), compile_cell=True)(torch.randn(1, 100, 2))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, repr(settings()[:4]).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = eval(os.read(r, 2000).decode())
        assert child == before[:4], (child, before[:4])
        after = settings()
        assert after == before, [(a, b) for a, b in zip(after, before) if a != b]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_no_module_sets_allocator_or_global_config():
    """glibc's allocator settings (mallopt) and torch's global switches are never set by the
    library itself: only pararnn.runtime offers process settings, as opt-in calls."""
    import pathlib

    forbidden = ("mallopt", "register_at_fork", "set_num_threads", "THREADING_LAYER =", "set_default_dtype",
                 "set_float32_matmul_precision", "use_deterministic_algorithms", "_dynamo.config.",
                 "os.environ[")
    root = pathlib.Path(pararnn.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for word in forbidden:
            if word in text:
                assert path.name in ("runtime.py", "compat.py"), (path, word)


# ------------------------------------------------------------------ 11: ordinary output tensors
@pytest.mark.parametrize("grad", [True, False])
def test_parallel_output_is_an_ordinary_tensor(grad):
    cell = ParaGRU(3, 4)
    x = torch.randn(2, 10, 3, requires_grad=grad)
    y, hT = pararnn.RNN(cell)(x)
    y.view(-1, 4)
    y2 = y.clone()
    y += 1
    torch.testing.assert_close(y, y2 + 1)
    if grad:
        y.sum().backward()
        assert x.grad is not None


# ------------------------------------------------------------------ 12: warnings
def test_convergence_warning_is_stable_and_once_per_module():
    cell = DenseTanh(3, 6).double()
    rnn = pararnn.RNN(cell, max_iters=1, init="zeros")
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(20):
            rnn(x)
    msgs = [str(w.message) for w in caught if issubclass(w.category, pararnn.ConvergenceWarning)]
    assert len(msgs) == 1 and "recomputed sequentially" in msgs[0]
    assert bool(rnn.last_info.fell_back.all())  # the numbers live on SolverInfo


# ------------------------------------------------------------------ 13: options validated when set
@pytest.mark.parametrize("kw, match", [
    ({"backend": "numba"}, "backend"),
    ({"atol": float("inf")}, "atol"),
    ({"rtol": float("nan")}, "rtol"),
    ({"check_cell": "yes"}, "check_cell"),
    ({"process_group": "world"}, "process_group"),
    ({"max_iters": True}, "max_iters"),
])
def test_options_are_validated_when_set(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pararnn.RNN(ParaGRU(3, 4), **kw)
    rnn = pararnn.RNN(ParaGRU(3, 4))
    with pytest.raises((ValueError, TypeError), match=match):
        rnn(torch.randn(1, 5, 3), **kw)
