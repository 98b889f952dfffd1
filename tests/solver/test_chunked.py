"""chunk_size: the solve in time chunks with recomputation equals the whole solve (fp64), and its
memory does not grow with T × state."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import BlockTanh, DenseTanh, DiagGRU, rel_err

import pararnn
from pararnn.models import LRU, DeltaNet, SequenceModel
from pararnn.solver.options import auto_chunk_size

CELLS = {
    "diagonal": lambda: DiagGRU(3, 6),
    "block": lambda: BlockTanh(3, 6, 2),
    "dense": lambda: DenseTanh(3, 6),
    "shared_block": lambda: DeltaNet(3, 4, 5),
    "complex": lambda: LRU(3, 6),
}


def _run(rnn, x, h0, **kw):
    y, hT = rnn(x, h0, **kw)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.real.dtype).reshape(y.shape)
    loss = (y * w).sum().real + hT.abs().square().sum()
    return y, hT, torch.autograd.grad(loss, [x, h0, *rnn.cell.parameters()])


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("C", [1, 7, 64])
def test_chunked_equals_whole(kind, mode, C):
    """Values, final state and gradients (x, h0, every parameter); C = 1, C not dividing T, C >= T."""
    torch.manual_seed(0)
    cell = CELLS[kind]().double()
    T = 50
    x = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, cell.state_size, dtype=cell.state_dtype(cell.prepare(x[:, :1])), requires_grad=True)
    ref = _run(pararnn.RNN(cell, mode=mode), x, h0)
    rnn = pararnn.RNN(cell, mode=mode, chunk_size=C)
    got = _run(rnn, x, h0)
    assert rel_err(got[0], ref[0]) < 1e-11 and rel_err(got[1], ref[1]) < 1e-11
    for a, b in zip(got[2], ref[2]):
        assert rel_err(a, b) < 1e-9
    if mode == "parallel" and C < T:
        assert len(rnn.last_info.chunks) == -(-T // C) and rnn.last_info.all_converged


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_chunked_with_lengths_packing_warm_start_and_layers(mode):
    torch.manual_seed(1)
    cell = DiagGRU(3, 6).double()
    x = torch.randn(3, 40, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([40, 1, 17])
    ref = _run(pararnn.RNN(cell, mode=mode), x, h0, lengths=lengths)
    got = _run(pararnn.RNN(cell, mode=mode, chunk_size=9), x, h0, lengths=lengths)
    for a, b in zip([*got[:2], *got[2]], [*ref[:2], *ref[2]]):
        assert rel_err(a, b) < 1e-9
    cu = torch.tensor([0, 5, 6, 40])
    xp, h0p = x[:1].detach(), h0.detach()
    torch.testing.assert_close(pararnn.RNN(cell, mode=mode, chunk_size=4)(xp, h0p, cu_seqlens=cu)[0],
                               pararnn.RNN(cell, mode=mode)(xp, h0p, cu_seqlens=cu)[0])
    warm = pararnn.RNN(cell, chunk_size=8)
    with torch.no_grad():
        H = pararnn.RNN(cell)(x)[0]
        y, _, info = warm(x, init=H, return_info=True)  # a warm start is sliced per chunk
    torch.testing.assert_close(y, H)
    assert all(c.iterations <= 1 for c in info.chunks)
    model = SequenceModel(5, 2, d_model=8, n_layers=2, solver_options={"chunk_size": 16}).double()
    ref_model = SequenceModel(5, 2, d_model=8, n_layers=2).double()
    ref_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 5, (2, 50))
    torch.testing.assert_close(model(tokens)[0], ref_model(tokens)[0])


def test_chunked_with_the_triton_backend():
    pytest.importorskip("triton")
    torch.manual_seed(2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/conftest.py)
    cell = BlockTanh(3, 8, 2).to(dev)  # fp32: the Triton kernels' dtypes
    x = torch.randn(1, 13, 3, device=dev, requires_grad=True)
    h0 = torch.randn(1, 8, device=dev, requires_grad=True)
    ref = _run(pararnn.RNN(cell, backend="reference"), x, h0)
    got = _run(pararnn.RNN(cell, backend="triton", chunk_size=5), x, h0)
    for a, b in zip([*got[:2], *got[2]], [*ref[:2], *ref[2]]):
        assert rel_err(a, b) < 1e-4


def test_auto_chunk_size_rule_and_budget():
    # 8 · (d + jac) · itemsize · B bytes per step: d = 64 diagonal fp32, B = 1 -> 4096 B per step
    assert auto_chunk_size(1, 10_000, 64, 64, 4, 1 << 30) is None  # fits: no chunking
    assert auto_chunk_size(1, 10**7, 64, 64, 4, 1 << 20) == 256
    assert auto_chunk_size(1, 10**7, 64, 64, 4, 1000) == 64  # never below 64 steps
    cell = DiagGRU(3, 64).double()
    rnn = pararnn.RNN(cell, chunk_size="auto", memory_budget=8 * 8 * 128 * 128)  # 128 steps: 8 B · 8 · (64 + 64)
    x = torch.randn(1, 300, 3, dtype=torch.float64)
    y, _, info = rnn(x, return_info=True)
    assert len(info.chunks) == 3
    torch.testing.assert_close(y, pararnn.RNN(cell)(x)[0])


def test_chunked_on_a_fresh_cell():
    """The first call of a new cell runs its one-off checks; inside a checkpointed chunk they would
    save tensors that the backward's recompute does not (a CheckpointError)."""
    torch.manual_seed(0)
    cell = DiagGRU(3, 4).double()
    x = torch.randn(2, 50, 3, dtype=torch.float64, requires_grad=True)
    y, _ = pararnn.RNN(cell, chunk_size=8)(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    y2, _ = pararnn.RNN(cell, mode="sequential")(x2)
    (gx2,) = torch.autograd.grad(y2.sum(), x2)
    torch.testing.assert_close(gx, gx2)


def test_chunked_refusals():
    class MixesTime(DiagGRU):
        def prepare(self, x):
            return self.W(torch.cumsum(x, 1))  # step t reads every earlier step

    cell = MixesTime(3, 4)
    with pytest.raises(ValueError, match="mixes time steps"):
        pararnn.RNN(cell, chunk_size=4)(torch.randn(1, 20, 3))
    with pytest.raises(ValueError, match="chunk_size must be"):
        pararnn.RNN(DiagGRU(3, 4), chunk_size=0)
    with pytest.raises(TypeError, match="renamed eval_chunk"):
        pararnn.RNN(DiagGRU(3, 4), chunk=10)


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch, pararnn
    from pararnn.models import DeltaNet

    def status_kb(key):  # VmRSS / VmHWM of this process, in kB
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    torch.set_num_threads(1)
    T, C = int(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    cell = DeltaNet(16, 32, 32)  # state 32 x 32 = 1024 entries per step, output 32
    x = torch.randn(1, T, 16, requires_grad=True)
    rnn = pararnn.RNN(cell, chunk_size=None if C == "none" else int(C))
    # reset the peak to the current RSS: ru_maxrss would start at the forking parent's RSS (it
    # survives exec on Linux), which hides everything below it when pytest itself is large
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    y, _ = rnn(x)
    y.sum().backward()
    print((status_kb("VmHWM") - base) / 1024)  # MB above the inputs
""")


def _peak_mb(*cases):
    """Peak RSS (MB) of one solve per ``(T, C)`` case, each in its own process, all at once."""
    # glibc keeps freed buffers of up to 32 MB in its heap (its mmap threshold adapts upward), so RSS
    # would count the chunks' freed temporaries; a fixed 64 KB threshold makes RSS follow live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, "-c", MEMORY_SCRIPT, str(T), str(C)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for T, C in cases]
    peaks = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        peaks.append(float(out.split()[-1]))
    return peaks


def test_chunked_memory_does_not_grow_with_T_times_state():
    """From T = 4000 to 16000 the whole solve's peak grows by ~12000 × 4 KB states × several copies
    (hundreds of MB); chunked at C = 256 only the O(T·(input + output)) part grows (~10 MB)."""
    small, large, whole_small, whole_large = _peak_mb((4000, 256), (16000, 256), (4000, "none"), (16000, "none"))
    assert whole_large - whole_small > 200, (whole_small, whole_large)  # the test can tell the difference (~240 MB)
    assert large - small < 60, (small, large)


@pytest.mark.parametrize("opts", [{}, {"jacobian_clip": 0.8}, {"damping": 0.7}, {"mask": True}])
@torch.no_grad()
def test_replay_repeats_the_solve_exactly(opts):
    """newton_solve(replay=replay_steps(info)) after a solve that converged in k steps gives the same states and
    Jacobians, bit for bit, without the convergence measures (what a chunked recompute runs)."""
    from pararnn.solver.newton import newton_solve, replay_steps
    from pararnn.solver.options import SolverOptions

    torch.manual_seed(2)
    cell = BlockTanh(3, 6, 2)
    u = cell.prepare(torch.randn(3, 30, 3) * 2)
    h0 = torch.randn(3, 6)
    mask = (torch.arange(30) < torch.tensor([30, 11, 23])[:, None]) if opts.pop("mask", False) else None
    o = SolverOptions(**opts)
    S, J, info = newton_solve(cell, u, h0, o, mask=mask)
    steps = replay_steps(info)
    k = len(steps)
    assert k == info.iterations and k >= 3
    S2, J2, info2 = newton_solve(cell, u, h0, o, mask=mask, replay=steps)
    assert torch.equal(S, S2) and torch.equal(J, J2) and info2.iterations == k
    S3 = newton_solve(cell, u, h0, o, mask=mask, replay=steps[:-1])[0]
    assert not torch.equal(S, S3)  # one step fewer is another iterate: the test can tell


def _evaluate_measures(monkeypatch) -> list:
    """The ``measure`` argument of every later call of pararnn.solver.evaluate.evaluate, in order."""
    from pararnn.solver import newton

    calls = []
    orig = newton.evaluate

    def spy(*a, **k):
        calls.append(a[10] if len(a) > 10 else k.get("measure", True))
        return orig(*a, **k)

    monkeypatch.setattr(newton, "evaluate", spy)
    return calls


@pytest.mark.parametrize("B,T,eval_chunk", [(1, 200, 1 << 18), (3, 90, 64)])
@torch.no_grad()
def test_compiled_replay_repeats_the_solve_exactly(B, T, eval_chunk):
    """With compile_cell a replay gives the states and Jacobians of its solve, bit for bit, with one
    piece and several per evaluation. (It runs, evaluation by evaluation, the compiled variant its
    solve ran: the first check without the q measure. On this cell the variants happen to round
    r and J alike, so running the other variant would pass here too: the test checks the replay.)"""
    from pararnn.models import ParaGRU
    from pararnn.solver.newton import newton_solve, replay_steps
    from pararnn.solver.options import SolverOptions

    torch.manual_seed(4)
    cell = ParaGRU(3, 8)
    u = cell.prepare(torch.randn(B, T, 3) * 2)
    h0 = torch.randn(B, 8)
    o = SolverOptions(compile_cell=True, eval_chunk=eval_chunk)
    S, J, info = newton_solve(cell, u, h0, o)
    steps = replay_steps(info)
    k = len(steps)
    assert k == info.iterations and k >= 2
    S2, J2, _ = newton_solve(cell, u, h0, o, replay=steps)
    assert torch.equal(S, S2) and torch.equal(J, J2)
    assert not torch.equal(S, newton_solve(cell, u, h0, o, replay=steps[:-1])[0])  # the test can tell


def test_first_check_from_f_h0_u_skips_q_only(monkeypatch):
    """From the initial guess f(h0, u_t) the first check measures max|r| but not q (T > 1); a warm
    start, zeros or T = 1 measure both, so an exact first iterate still converges in 0 steps."""
    from pararnn.models import ParaGRU

    calls = _evaluate_measures(monkeypatch)
    torch.manual_seed(5)
    cell = ParaGRU(3, 8)
    rnn = pararnn.RNN(cell, mode="parallel")
    x = torch.randn(2, 40, 3)
    with torch.no_grad():
        y, _, info = rnn(x, return_info=True)
        assert calls[0] == "err" and all(c is True for c in calls[1:]) and len(calls) == info.iterations + 1
        calls.clear()
        y2, _, info2 = rnn(x, init=y.detach(), return_info=True)  # a warm start at the solution
        assert calls == [True] and info2.iterations == 0
        calls.clear()
        _, _, info3 = rnn(x[:, :1], return_info=True)  # T = 1: f(h0, u_1) is the solution
        assert calls == [True] and info3.iterations == 0


def test_chunked_backward_replays_without_measures(monkeypatch):
    """The recompute of a checkpointed chunk evaluates the cell without the convergence measures
    (measure=False) and as many times as its forward did; a chunk that fell back takes the full
    solve again."""
    calls = _evaluate_measures(monkeypatch)
    torch.manual_seed(3)
    cell = DeltaNet(3, 4, 5)
    x = torch.randn(2, 24, 3, requires_grad=True)
    rnn = pararnn.RNN(cell, mode="parallel", chunk_size=8)
    y, _, info = rnn(x, return_info=True)
    forward = list(calls)
    assert forward and all(forward)
    calls.clear()
    y.sum().backward()
    # chunks 0 and 1 are recomputed (the last one keeps its graph): iterations + 1 evaluations each
    steps = [c.iterations for c in info.chunks[:2]]
    assert calls == [False] * sum(s + 1 for s in steps)


def test_replay_steps_only_for_clean_parallel_solves():
    from pararnn.solver.newton import replay_steps
    from pararnn.solver.options import SolverInfo

    ok = torch.ones(2, dtype=torch.bool)
    assert replay_steps(SolverInfo(mode="parallel", iterations=3, converged=ok, fell_back=~ok)) == [None] * 3
    assert replay_steps(SolverInfo(mode="parallel", iterations=3, converged=ok, fell_back=torch.tensor([False, True]))) is None
    assert replay_steps(SolverInfo(mode="parallel", iterations=3, converged=torch.tensor([True, False]),
                                   fell_back=~ok)) is None
    assert replay_steps(SolverInfo(mode="parallel", iterations=3, converged=ok, fell_back=~ok, safeguarded=True)) is None
    assert replay_steps(SolverInfo(mode="sequential")) is None and replay_steps(None) is None


class _DropoutGRU(DiagGRU):
    """Dropout in ``prepare``, where the guide puts a cell's dropout."""

    def prepare(self, x):
        return torch.nn.functional.dropout(super().prepare(x), 0.3, self.training)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_a_dropout_in_prepare_draws_the_chunks_masks_only(mode):
    """With chunk_size each chunk's prepare draws its own dropout mask, in order, and the backward's
    recompute draws the same one again; pararnn's one-off checks draw nothing from the caller's
    random stream (they misjudged the dropout as mixing time steps, and shifted the stream). The
    reference draws the masks chunk by chunk in the same order and runs a plain loop (fp64)."""
    torch.manual_seed(0)
    cell = _DropoutGRU(3, 4).double().train()
    x = torch.randn(2, 50, 3, dtype=torch.float64)

    def grads(y, h, xx):
        return torch.autograd.grad(y.sin().sum() + h.sum(), [xx, *cell.parameters()])

    torch.manual_seed(1)
    xx = x.clone().requires_grad_()
    y, h = pararnn.RNN(cell, mode=mode, chunk_size=16)(xx)
    got = [y, h, *grads(y, h, xx)]
    torch.manual_seed(1)
    xr = x.clone().requires_grad_()
    hr, hs = cell.initial_state(2, torch.float64, "cpu"), []
    for x_c in xr.split(16, dim=1):
        u = cell.prepare(x_c)
        for t in range(u.shape[1]):
            hr = cell.step(hr, u[:, t])
            hs.append(hr)
    yr = torch.stack(hs, 1)
    want = [yr, hr, *grads(yr, hr, xr)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _BatchNormGRU(DiagGRU):
    """A batch norm over B and T in ``prepare``: in training mode it mixes the time steps."""

    def __init__(self, din, d):
        super().__init__(din, d)
        self.norm = torch.nn.BatchNorm1d(din)

    def prepare(self, x):
        return super().prepare(self.norm(x.transpose(1, 2)).transpose(1, 2))


def test_a_batch_norm_over_time_in_prepare_is_refused_in_training_only():
    """Training-mode statistics over T differ per chunk: refused, naming the cause, with the running
    statistics untouched by the check; in eval mode the same cell chunks exactly."""
    torch.manual_seed(0)
    cell = _BatchNormGRU(3, 4).double()
    x = torch.randn(2, 40, 3, dtype=torch.float64)
    stats = {k: v.clone() for k, v in cell.norm.named_buffers()}
    with pytest.raises(ValueError, match="batch norm over T"):
        pararnn.RNN(cell, chunk_size=16)(x)
    for k, v in cell.norm.named_buffers():
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0)
    cell.eval()
    torch.testing.assert_close(pararnn.RNN(cell, chunk_size=16)(x)[0], pararnn.RNN(cell)(x)[0])
