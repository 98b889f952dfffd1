"""`RNN`: run a `Cell` over a sequence, in parallel (Newton + scans) or sequentially."""
from __future__ import annotations

import collections
import dataclasses
import math
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .cell import Cell, is_affine, verify_cell
from .dispatch import auto_backend
from .newton import (ConvergenceError, SolverInfo, SolverOptions, auto_chunk_size, can_compile, compiled_piece,
                     contiguous_pieces, graph_piece, handle_failure, newton_solve, replay_steps, sequential_solve,
                     static_features)
from .parallel import context_for
from .runtime import release_freed_memory
from .scan import check_cu_seqlens
from .structure import as_structure, compose, run_transition
from .workspace import workspace

MODES = ("parallel", "sequential", "auto")


class _Adjoint(torch.autograd.Function):
    """Identity on the solution whose backward is the adjoint scan.

    Inputs: the converged states ``H [B, T, d]`` (no grad), ``J [B, T, *jac]`` (df/dh at H), the
    initial state ``h0 [B, d]`` (or None where this solve does not own it) and the pieces
    ``f_p [N_p, d]`` of one graph-carrying evaluation ``f(h_{t-1}, u_t)`` at the solution, one per
    ``(b0, b1, t0, t1)`` of ``pieces`` (rows in (b, t) order). Output: H. Backward: the state
    cotangents solve ``λ_t = g_t + J_{t+1}^H λ_{t+1}`` (one reverse scan); λ, cut into the same
    pieces, is the cotangent of each f_p, so autograd's ordinary vjp of ``step`` delivers the
    gradients of u and of anything else step depends on (parameters, functional_call swaps,
    closures), and h0's is ``J_1^H λ_1`` (its vjp through the first step). Nothing from the Newton
    iterations is kept.
    """

    @staticmethod
    def forward(ctx, H, J, h0, structure, backend, pctx, pieces, *f_pieces):
        ctx.save_for_backward(J)
        ctx.structure, ctx.backend, ctx.pctx, ctx.pieces = structure, backend, pctx, pieces
        return H.clone()  # an ordinary tensor (H is a view of the solver's [B, T+1, d] buffer)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "pararnn: double backward (create_graph=True) through a parallel solve is not supported: "
                "the Jacobians of the solve are not differentiable. Use mode='sequential' for "
                "higher-order gradients.")
        (J,) = ctx.saved_tensors
        st = ctx.structure
        lam = ctx.pctx.adjoint_scan(J, g.contiguous(), st, backend=ctx.backend)  # [B, T, d]
        gh0 = st.matvec(st.transpose(J[:, 0]), lam[:, 0]) if ctx.needs_input_grad[2] else None  # [B, d]
        f_grads = split_pieces(lam, ctx.pieces) if ctx.pieces else []  # no pieces: only h0 wants a gradient
        return (None, None, gh0, None, None, None, None, *f_grads)


def parallel_solve(cell, u: torch.Tensor, h0: torch.Tensor, opts: SolverOptions, warn=None,
                   mask: torch.Tensor | None = None, on_jacobians=None, replay: int | None = None):
    """Differentiable parallel solve: ``(H [B, T, d], SolverInfo)``.

    Newton runs without a graph, then the failure policy (``opts.on_fail``) is applied. If
    gradients are wanted, one more evaluation of ``step`` at the solution (in pieces, see
    :func:`pararnn.newton.contiguous_pieces`; compiled with ``compile_cell``) carries the graph,
    and :class:`_Adjoint` turns the incoming state gradients into its cotangents with one
    reverse-time scan. ``mask [B, T]`` (False = padded step) holds the state there.
    ``on_jacobians(J)``, if given, is called with ``J [B, T, *jac]`` at the solution (no grad; valid
    during the call only: without gradients J's buffer is kept for the next solve).
    ``replay=k``: repeat a solve that converged in k steps (see :func:`pararnn.newton.newton_solve`).
    """
    if _under_torch_func():
        raise RuntimeError(TORCH_FUNC_MSG)
    pctx = context_for(opts.process_group)
    if opts.check_cell:
        _verify_once(cell, u, h0)
    inference = not torch.is_grad_enabled()
    with torch.no_grad(), workspace(u.device) as ws:
        # S: [B, T+1, d] = (h0, h_1..h_T). Without gradients S and J die here too: kept buffers.
        S, J, info = newton_solve(cell, u, h0, opts, pctx, mask, replay, ws=ws, outputs_from_ws=inference)
        handle_failure(cell, u, S, J, info, opts, pctx, mask=mask, **({} if warn is None else {"warn": warn}))
        if on_jacobians is not None:
            on_jacobians(J)
        if inference:
            return S[:, 1:].clone(), info  # not a view of the solver's buffer: y.view(), y += 1 work
    H = S[:, 1:]
    B, T, d = H.shape
    h0 = h0 if pctx.owns_h0() and h0.requires_grad else None  # h_{-1} = h0: its gradient is J_1^H λ_1
    pieces = contiguous_pieces(B, T, d, opts.eval_chunk)
    piece = compiled_piece(graph_piece, cell) if opts.compile_cell and can_compile(H) else graph_piece
    f_pieces = []
    for (b0, b1, t0, t1), u_p in zip(pieces, split_pieces(u, pieces)):
        N = (b1 - b0) * (t1 - t0)
        hp = S[b0:b1, t0:t1].reshape(N, d)  # previous states, no grad (a copy for several rows)
        m = None if mask is None else mask[b0:b1, t0:t1].reshape(N)  # padded steps hold the state
        if piece is not graph_piece:
            static_features(1, hp, u_p)
        f = piece(cell, hp, u_p, m)  # [N, d]
        if not f.requires_grad:
            if h0 is None:
                return H.clone(), info  # nothing upstream wants a gradient
            f_pieces, pieces = [], []  # only h0 does
            break
        f_pieces.append(f)
    return _Adjoint.apply(H, J, h0, cell.get_structure(), opts.backend, pctx, pieces, *f_pieces), info


def split_pieces(x: torch.Tensor, pieces: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
    """``x [B, T, *]`` cut into the pieces ``[N_p, *]`` of :func:`pararnn.newton.contiguous_pieces`
    (runs of memory, rows in (b, t) order) by one split of ``x`` flattened to ``[B·T, *]``, so that
    autograd's backward is one cat (a slice's backward writes a full-size tensor per slice). One
    piece is the flattened view itself, whose backward is a view too (a split into one piece cost
    a copy in the backward: 0.5 ms of a 3.5 ms backward at B = 1, T = 4096, d = 64)."""
    flat = x.reshape(-1, *x.shape[2:])
    if len(pieces) == 1:
        return [flat]
    return list(flat.split([(b1 - b0) * (t1 - t0) for b0, b1, t0, t1 in pieces]))


TORCH_FUNC_MSG = (
    "pararnn: torch.func transforms (grad, vmap, jacrev, functional_call under them) cannot trace a parallel "
    "solve (its Newton loop and scans run outside autograd's functional tracing). Use mode='sequential' "
    "(or 'auto') under torch.func, or ordinary autograd (loss.backward(), torch.autograd.grad), which the "
    "parallel solve supports.")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one min/max pass (NaN propagates through both, ±Inf
    is an extreme). ``torch.isfinite(t).all()`` writes a bool tensor of t's size first: 40 ms
    against 1.4 ms for x [8, 4096, 256] fp32 on one core of the benchmark machine."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    t = t.detach()
    lo, hi = torch.aminmax(torch.view_as_real(t) if t.is_complex() else t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is tracing this call."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@dataclasses.dataclass
class SolveStats:
    """Running totals of an :class:`RNN`'s solves since construction or :meth:`reset`, so drift in
    Newton steps or fallbacks during training is visible (``rnn.stats``)."""

    calls: int = 0
    parallel_calls: int = 0
    newton_steps: int = 0
    max_newton_steps: int = 0
    sequences: int = 0
    fell_back: int = 0
    not_converged: int = 0
    safeguarded: int = 0
    sweeps: int = 0

    def record(self, info: SolverInfo) -> None:
        self.calls += 1
        if info.mode != "parallel":
            return
        self.parallel_calls += 1
        self.newton_steps += info.iterations
        self.max_newton_steps = max(self.max_newton_steps, info.iterations)
        self.sequences += len(info.converged)
        self.fell_back += int(info.fell_back.sum())
        self.not_converged += int((~info.converged).sum())
        self.safeguarded += int(info.safeguarded)
        self.sweeps += info.sweeps

    @property
    def mean_newton_steps(self) -> float:
        return self.newton_steps / max(self.parallel_calls, 1)

    def reset(self) -> None:
        self.__init__()

    def summary(self) -> dict:
        return {**dataclasses.asdict(self), "mean_newton_steps": self.mean_newton_steps}


_HALF = (torch.float16, torch.bfloat16)


def _autocast_dtype(device: torch.device):
    """The autocast dtype active for this device type, or None."""
    kind = device.type if device.type in ("cpu", "cuda") else None
    if kind is None or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


class CellFacts:
    """What the one-off probes found about a cell (kept in ``cell.__dict__``): which (dtype, device,
    structure) passed :func:`pararnn.cell.verify_cell`, whether ``prepare`` is per step, and whether
    ``step`` is affine in h (``init="auto"`` reads it).

    The facts belong to the cell's current parameters. They are forgotten when a parameter or
    buffer is replaced, moved or cast (its identity changes) and on ``load_state_dict``
    (:meth:`Cell._load_from_state_dict`); in-place updates (training) renew them on the 1st, 2nd,
    4th, 8th, ... update seen, so a run of n optimiser steps re-probes about log2(n) times (the probe
    costs 7-23 ms at d = 64-256, a few percent of a training step)."""

    def __init__(self, ident):
        self.ident, self.version, self.updates, self.next_check = ident, None, 0, 1
        self.verified: set = set()
        self.affine = False

    @staticmethod
    def of(cell) -> "CellFacts":
        """The cell's facts, renewed first if its parameters changed (see the class docstring)."""
        tensors = [*cell.parameters(), *cell.buffers()]
        ident = tuple((id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors)
        version = sum(-1 if t.is_inference() else t._version for t in tensors)  # (no counter in inference mode)
        facts = cell.__dict__.get("_pararnn_facts")
        if facts is None or facts.ident != ident:
            facts = cell.__dict__["_pararnn_facts"] = CellFacts(ident)
        elif facts.version is not None and version != facts.version:
            facts.updates += 1
            if facts.updates >= facts.next_check:
                facts.verified.clear()
                facts.affine = False
                facts.next_check *= 2
        facts.version = version
        return facts


def _verify_key(cell, h0: torch.Tensor):
    """What :func:`_verify_once` verifies once: the cell at this dtype, device and structure."""
    return h0.dtype, h0.device, str(cell.get_structure())


def _verified(cell, h0: torch.Tensor) -> bool:
    return _verify_key(cell, h0) in CellFacts.of(cell).verified


def _verify_once(cell, u: torch.Tensor, h0: torch.Tensor, n: int = 4) -> None:
    """Run :func:`pararnn.cell.verify_cell` once per cell, dtype and device, at n sampled positions
    (again after the cell's parameters change: :class:`CellFacts`)."""
    if _verified(cell, h0):
        return
    B, T = u.shape[:2]
    b = torch.arange(n, device=u.device) % B
    t = torch.linspace(0, T - 1, n, device=u.device).long()
    with torch.no_grad():
        u_s = u[b, t].detach()  # [n, *]
        h_s = cell.step(h0[b].detach(), u_s)  # a state at the scale the solve will see, [n, d]
    with torch.enable_grad(), torch.autocast(u.device.type, enabled=False):  # the cell's math, in full precision
        verify_cell(cell, h_s, u_s)
        affine = is_affine(cell, h_s, u_s)
    facts = CellFacts.of(cell)
    facts.affine = affine  # init="auto" reads it
    facts.verified.add(_verify_key(cell, h0))


class _Place(torch.autograd.Function):
    """``buf[:, t0:t0+n] = y_c`` in place, returning buf: a chunked solve's outputs go into one
    buffer as each chunk finishes (a cat at the end would hold every chunk and the result at once).
    Backward: buf's gradient passes through unchanged (each earlier write reads only its own
    slice of it) and y_c gets its slice, a view."""

    @staticmethod
    def forward(ctx, buf, y_c, t0: int):
        ctx.t0, ctx.n = t0, y_c.shape[1]
        buf[:, t0:t0 + ctx.n].copy_(y_c)
        ctx.mark_dirty(buf)
        return buf

    @staticmethod
    def backward(ctx, g):
        return g, g[:, ctx.t0:ctx.t0 + ctx.n], None


class _Bind(nn.Module):
    """Calls ``fn(*args)`` with ``root`` as a submodule, so :func:`torch.func.functional_call` can
    bind root's parameters and buffers around any function, not only ``root.forward``."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root

    def forward(self, fn, *args):
        return fn(*args)


class _ForwardState:
    """``fn(*args)`` (a chunk's solve, activation-checkpointed) run with the parameters and buffers
    the cell had when the forward ran, so the backward's recompute evaluates the same function:
    under ``torch.func.functional_call`` the module's own tensors are back in place by the time the
    backward runs. A tensor changed in place since the forward (its version counter moved) raises,
    as autograd does for the tensors it saves. Parameters bound from an owner (``pararnn.nn``) are
    the owner's."""

    def __init__(self, cell, fn):
        root = cell.__dict__.get("_owner", cell)
        self.bind, self.fn = _Bind(root), fn
        self.state = {f"root.{k}": t for k, t in [*root.named_parameters(remove_duplicate=False),
                                                   *root.named_buffers(remove_duplicate=False)]}
        self.versions = {k: t._version for k, t in self.state.items()}

    def __call__(self, *args):
        for k, t in self.state.items():
            if t._version != self.versions[k]:
                raise RuntimeError(
                    f"pararnn: {k.removeprefix('root.')} was modified in place between the forward and the "
                    "backward of a chunked solve (chunk_size), whose backward recomputes each chunk with "
                    "it; call backward before changing it (e.g. before optimizer.step()).")
        return torch.func.functional_call(self.bind, self.state, (self.fn, *args), tie_weights=False)


class _LinkRanks(torch.autograd.Function):
    """Identity on this rank's ``(y, h_last)`` (returned as copies) whose backward adds the cotangent
    ``μ`` of h_last from the later ranks (see :meth:`RNN._solve_across_ranks`). ``s_in`` is this rank's entering
    state (a leaf; None on the first rank, which needs no ``g``)."""

    @staticmethod
    def forward(ctx, pctx, structure, P, s_in, y, h):
        ctx.pctx, ctx.structure, ctx.P, ctx.s_in = pctx, structure, P, s_in
        ctx.save_for_backward(y, h)
        # copies, not views: a custom Function's view output cannot be modified in place (y += skip),
        # and marking y dirty instead would route the backward's own grad of (y, h) back into this node
        return y.clone(), h.clone()

    @staticmethod
    def backward(ctx, gy, gh):
        y, h = ctx.saved_tensors
        gy = torch.zeros_like(y) if gy is None else gy
        gh = torch.zeros_like(h) if gh is None else gh
        g = torch.zeros_like(h)
        if ctx.s_in is not None:  # the entering state's cotangent from this rank's own outputs
            with torch.enable_grad():
                (g,) = torch.autograd.grad((y, h), ctx.s_in, (gy, gh), retain_graph=True, allow_unused=True)
            g = torch.zeros_like(h) if g is None else g
        mu = ctx.pctx.link_cotangents(g, ctx.P, ctx.structure)
        return None, None, None, None, gy, gh + mu


def _renamed(options: dict) -> dict:
    if "chunk" in options:
        raise TypeError("the solver option chunk was renamed eval_chunk (state elements per cell evaluation); "
                        "chunk_size is the number of time steps per solve chunk")
    return options


def _check_prepare_is_per_step(cell, x: torch.Tensor, n: int = 6) -> None:
    """``chunk_size`` prepares each chunk on its own, which is right only if ``prepare`` acts on each
    time step independently: checked once per cell on the first ``n`` steps of one sequence."""
    done = CellFacts.of(cell).verified
    if "prepare_per_step" in done or x.shape[1] < 3:
        return
    xs = x[:1, :n].detach()
    with torch.no_grad():
        whole, tail = cell.prepare(xs)[:, 2:], cell.prepare(xs[:, 2:])
    if not torch.allclose(whole, tail, rtol=1e-4, atol=1e-6 * (1 + float(whole.abs().max()))):
        raise ValueError(f"chunk_size needs a prepare() that acts on each time step on its own, but "
                         f"{type(cell).__name__}.prepare mixes time steps (e.g. a convolution over T): "
                         f"chunks would see different inputs. Use chunk_size=None for this cell.")
    done.add("prepare_per_step")


def choose_mode(B: int, T: int, d: int, device: torch.device, structure="diagonal",
                training: bool = True, dtype: torch.dtype = torch.float32, backend: str = "auto",
                compile_cell: bool = False) -> str:
    """The ``mode="auto"`` rule (measurements behind it: docs/convergence.md, "Choosing a mode").

    - Never a parallel solve whose scan would be the PyTorch loop over T (once per Newton step):
      sequential wherever :func:`pararnn.dispatch.auto_backend` answers ``"reference"`` (with
      ``backend="auto"``; e.g. a CPU without numba).
    - CUDA: parallel (Triton, or the log-depth ``"assoc"`` scan where no kernel exists; the scan
      is O(log T) deep and the step evaluations fill the device; not measured on a GPU yet).
    - CPU: the sequential loop costs ~T × per-step op latency, nearly independent of width; the
      parallel solve costs ~(Newton iterations) × B·T·d·k element operations, k the Jacobian
      width (block size, or d for dense; counted as at least 8 for diagonal cells, whose
      evaluation is a dozen elementwise ops per entry). Parallel wins when the work per step,
      ``B·d·max(k, 8)``, is small: up to 8192 when training (the parallel backward is one scan,
      the sequential one another T-step loop) and up to 1024 for inference. With
      ``compile_cell=True`` (the fused evaluation, 1.5-2.5× cheaper) and k <= 8 the limits are
      16384 and 2048 (dense cells keep the eager limits: their cost is the d×d Jacobians and
      scan, not the elementwise evaluation). T < 64 stays sequential.

    Calibration (benchmarks/bench_auto.py, T = 2048, AMD EPYC VM, results/bench_auto_*): the
    eager training step beats the loop up to work 16384 for ParaGRU (1.08-1.09× there at 1
    thread) but ParaLSTM (jvp Jacobian) loses there (0.51×), hence 8192; the eager forward wins at
    2048 (ParaGRU 1.57×) and loses at 4096 (0.95-0.98×), hence 1024. Compiled, the training step
    wins at 16384 for ParaGRU (1.59-2.11× at 1 thread, 2.47-3.10× at 2) and ParaLSTM at 2 threads
    (1.51×), not at 1 (0.75×); the forward wins at 2048 (ParaGRU 3.36×, 4.43× at 2 threads) and at
    4096-8192 only for ParaGRU (1.13-2.04×; ParaLSTM 0.56× at 4096, 1 thread). The rule sees
    neither the thread count nor whether the Jacobian is hand-written: it leaves wins on the table
    (compiled ParaGRU forward at 4096-8192; at 16384 it ties at 2 threads, 0.99-1.08×).
    """
    structure = as_structure(structure, d)
    if backend == "auto" and auto_backend(device, dtype, structure, d) == "reference":
        return "sequential"
    if device.type == "cuda":
        return "parallel"
    k = structure.width(d)
    if compile_cell and k <= AUTO_MIN_WIDTH:  # the fused evaluation cheapens elementwise work, not d×d Jacobians
        limit = AUTO_WORK_TRAINING_COMPILED if training else AUTO_WORK_INFERENCE_COMPILED
    else:
        limit = AUTO_WORK_TRAINING if training else AUTO_WORK_INFERENCE
    return "parallel" if (T >= AUTO_MIN_T and B * d * max(k, AUTO_MIN_WIDTH) <= limit) else "sequential"


# The CPU auto rule's constants, calibrated on `pararnn bench` (docs/convergence.md, "Choosing a mode"): the
# parallel fwd+bwd beat the strong loop up to B·d·k ≈ 8192 and the forward alone up to ≈ 1024;
# below T = 64 the loop's few steps cost less than Newton's fixed overhead; a diagonal cell's
# evaluation costs about 8 elementwise ops per entry, so it counts as k = 8.
AUTO_WORK_TRAINING = 8192
AUTO_WORK_INFERENCE = 1024
AUTO_WORK_TRAINING_COMPILED = 16384  # with compile_cell: see choose_mode's calibration
AUTO_WORK_INFERENCE_COMPILED = 2048
AUTO_MIN_T = 64
AUTO_MIN_WIDTH = 8


class RNN(nn.Module):
    """Run a :class:`pararnn.Cell` over sequences.

    Args:
        cell: the cell, ``h_t = cell.step(h_{t-1}, u_t)`` with ``u = cell.prepare(x)``.
        mode: ``"parallel"`` (Newton + parallel scans), ``"sequential"`` (a loop over T, plain
            autograd) or ``"auto"`` (see :func:`choose_mode`).
        **solver_options: fields of :class:`pararnn.SolverOptions` (max_iters, rtol, atol, init,
            on_fail, damping, backend, check_finite, chunk_size, memory_budget, eval_chunk,
            compile_cell, check_cell, process_group, ...).

    After each call, ``rnn.last_info`` is a :class:`pararnn.SolverInfo` (iterations, residual per
    iteration, which sequences converged or fell back).
    """

    def __init__(self, cell: Cell, mode: str = "parallel", **solver_options):
        super().__init__()
        if not isinstance(cell, Cell):
            raise TypeError(f"cell must be a pararnn.Cell, got {type(cell).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        cell.get_structure()  # validate the declaration early
        self.cell = cell
        self.mode = mode
        self.options = SolverOptions(**_renamed(solver_options))
        self.last_info: SolverInfo | None = None
        self.stats = SolveStats()
        self._solve_hooks: collections.OrderedDict[int, object] = collections.OrderedDict()

    def register_solve_hook(self, hook):
        """Call ``hook(rnn, info)`` after every forward (info: :class:`pararnn.SolverInfo`), e.g. to
        log Newton steps and fallbacks per layer and training step. Returns a handle whose
        ``remove()`` unregisters it, as torch.nn's hooks do."""
        handle = torch.utils.hooks.RemovableHandle(self._solve_hooks)
        self._solve_hooks[handle.id] = hook
        return handle

    def _warn_once(self, w: Warning) -> None:
        """Issue each warning text once per module (the numbers live on ``last_info``)."""
        seen = self.__dict__.setdefault("_warned", set())
        if str(w) not in seen:
            seen.add(str(w))
            warnings.warn(w, stacklevel=4)

    # ------------------------------------------------------------------ validation
    def _param_like(self):
        return next(iter(self.cell.parameters()), None)

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, T, D_in], got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be [B, T, D_in] (batch first), got shape {list(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("x has T = 0 time steps; need T >= 1")
        if x.shape[0] == 0:
            raise ValueError("x has batch size B = 0; need B >= 1")
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        isz = getattr(self.cell, "input_size", None)
        if isz is not None and x.shape[-1] != isz:
            raise ValueError(f"x must have D_in = cell.input_size = {isz} features, got {x.shape[-1]}")
        p = self._param_like()
        if p is not None:
            if x.device != p.device:
                raise ValueError(f"x is on {x.device} but the cell's parameters are on {p.device}")
            lower = _autocast_dtype(x.device) == x.dtype  # an autocast layer handed in its precision
            if x.dtype != p.dtype and not (x.is_complex() or p.is_complex() or lower):
                raise TypeError(f"x has dtype {x.dtype} but the cell's parameters are {p.dtype}")

    def _make_h0(self, h0, u: torch.Tensor) -> torch.Tensor:
        B = u.shape[0]
        dtype = self.cell.state_dtype(u)
        if h0 is None:
            return self.cell.initial_state(B, dtype, u.device)
        if not isinstance(h0, torch.Tensor):
            raise TypeError(f"h0 must be a torch.Tensor [B, state], got {type(h0).__name__}")
        want = (B, self.cell.state_size)
        if tuple(h0.shape) != want:
            raise ValueError(f"h0 must be [B, state] = {list(want)}, got {list(h0.shape)}")
        if h0.device != u.device:
            raise ValueError(f"h0 is on {h0.device} but x is on {u.device}")
        if h0.dtype != dtype:
            raise TypeError(f"h0 has dtype {h0.dtype} but the state dtype is {dtype}")
        return h0

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None, mode: str | None = None,
                return_info: bool = False, lengths: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, **solver_overrides):
        """Run the cell over ``x``.

        Args:
            x: ``[B, T, D_in]``, batch first.
            h0: ``[B, state]`` or None (zeros).
            mode: override the module's mode for this call.
            return_info: also return the :class:`SolverInfo`.
            lengths: ``[B]`` integer tensor of valid lengths for a right-padded batch (1 <= L <= T).
                Padded steps keep the state (the identity transition), ``y`` is zero there, ``h_T``
                is each sequence's state at its own last valid step, and padded inputs get zero
                gradient. With ``process_group`` every rank passes the same, whole-sequence lengths.
            cu_seqlens: packed sequences in flash-linear-attention's convention: ``x`` is
                ``[1, total, D_in]``, ``cu_seqlens [N+1]`` the cumulative offsets, ``h0`` is
                ``[N, state]`` and ``h_T`` is ``[N, state]``; each sequence starts from its own h0.
                (Solved as a padded batch of N sequences.)
            **solver_overrides: per-call :class:`SolverOptions` fields (e.g. ``init=H_prev``).

        Returns:
            ``(y [B, T, out], h_T [B, state])``, plus ``info`` if ``return_info``. ``y`` is
            ``cell.output(states, x)`` (the states themselves unless the cell has a readout);
            ``h_T`` is the full final state, ready to pass back as ``h0``.
        """
        if cu_seqlens is not None:
            if lengths is not None:
                raise ValueError("pass lengths or cu_seqlens, not both")
            return self._forward_packed(x, h0, mode, return_info, cu_seqlens, **solver_overrides)
        # parametrized weights (e.g. pararnn.models.bound_recurrent_weights) are computed once per
        # call, not at every one of the T sequential steps or Newton evaluations
        with parametrize.cached():
            # fill the cache now, in the caller's grad mode: a first access inside the solver's
            # no_grad Newton loop would cache a weight without a graph and lose its gradient
            for module in self.cell.modules():
                if parametrize.is_parametrized(module):
                    for name in module.parametrizations:
                        getattr(module, name)
            return self._forward(x, h0, mode, return_info, lengths, **solver_overrides)

    def _forward_packed(self, x, h0, mode, return_info, cu_seqlens, **solver_overrides):
        """``x [1, total, D]`` with ``cu_seqlens [N+1]``: unpacked to a right-padded ``[N, L_max, D]``
        batch, solved with ``lengths``, and packed back."""
        self._check_x(x)
        cu = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1]).to(x.device)
        lengths = cu[1:] - cu[:-1]  # [N]
        steps = torch.arange(int(lengths.max()), device=x.device)
        valid = steps[None, :] < lengths[:, None]  # [N, L_max]
        idx = (cu[:-1, None] + steps[None, :]).clamp(max=x.shape[1] - 1)  # [N, L_max]
        xp = x[0][idx] * valid[..., None].to(x.dtype)  # [N, L_max, D]
        out = self.forward(xp, h0, mode, return_info, lengths=lengths, **solver_overrides)
        return (out[0][valid].unsqueeze(0), *out[1:])  # y [1, total, out], h_T [N, state]

    def _padding_mask(self, lengths, x: torch.Tensor, opts) -> torch.Tensor | None:
        """``[B, T]`` bool, True at valid steps, from ``lengths [B]``; None without lengths."""
        if lengths is None:
            return None
        B, T_local = x.shape[:2]
        offset, T = context_for(opts.process_group).time_extent(T_local, x.device)  # this rank's steps
        if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.is_complex() \
                or lengths.dtype == torch.bool or tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must be an integer tensor [B] = [{B}], got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)} {list(getattr(lengths, 'shape', []))}")
        if bool((lengths < 1).any()) or bool((lengths > T).any()):
            raise ValueError(f"lengths must be in [1, T] = [1, {T}], got {lengths.tolist()}")
        return torch.arange(offset, offset + T_local, device=x.device) < lengths.to(x.device)[:, None]

    def _forward(self, x, h0, mode, return_info, lengths, **solver_overrides):
        self._check_x(x)
        opts = dataclasses.replace(self.options, **_renamed(solver_overrides)) if solver_overrides else self.options
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        functional = _under_torch_func()
        if functional:  # values cannot be inspected there: only the plain loop traces
            if mode == "parallel":
                raise RuntimeError(TORCH_FUNC_MSG)
            mode = "sequential"  # (activation checkpoints do not run under torch.func either)
            opts = dataclasses.replace(opts, check_finite=False, chunk_size=None)
        mask = self._padding_mask(lengths, x, opts)  # [B, T] or None
        if mask is not None:  # padding is padding: whatever it holds reaches no product, output or gradient
            x = x.masked_fill(~mask[..., None], 0)
        # with chunk_size every chunk prepares its own inputs: here one step, for dtypes and shapes
        chunked = opts.chunk_size is not None
        xp = x[:, :1] if chunked else x
        u = self._prepare(xp)  # [B, T, *]
        low = _autocast_dtype(u.device)
        real = u.real.dtype if u.is_complex() else u.dtype
        # step's matmuls run in `low`: converge to its precision (autocast leaves float64 alone)
        if low is not None and opts.rtol is None and real != torch.float64:
            tol = max(opts.tolerances(low)[0], opts.tolerances(real)[0])
            opts = dataclasses.replace(opts, rtol=tol)
        if u.shape[:2] != xp.shape[:2]:
            raise ValueError(f"{type(self.cell).__name__}.prepare must keep [B, T] leading dims: "
                             f"x {list(xp.shape)} -> u {list(u.shape)}")
        user_h0 = h0 is not None
        h0 = self._make_h0(h0, u)
        B, T = x.shape[:2]
        if opts.process_group is not None:  # every rank holds a chunk: only the parallel solve links them
            if mode == "sequential":
                raise ValueError("mode='sequential' cannot be combined with process_group (each rank would "
                                 "solve its chunk from h0); use mode='parallel', or drop process_group")
            mode = "parallel"
        if mode == "auto":
            training = torch.is_grad_enabled() and (
                u.requires_grad or h0.requires_grad or any(p.requires_grad for p in self.cell.parameters()))
            mode = choose_mode(B, T, self.cell.state_size, u.device, self.cell.get_structure(), training,
                               h0.dtype, opts.backend, compile_cell=opts.compile_cell and can_compile(h0))
        y, hT, info = self._solve(x, None if chunked else u, h0, user_h0, mode, opts, mask)
        return (y, hT, info) if return_info else (y, hT)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``cell.prepare(x)``; under autocast, half-precision inputs are brought back to the
        parameters' precision (the state, Jacobians and scans stay there)."""
        u = self.cell.prepare(x)
        if _autocast_dtype(u.device) is not None:
            p = self._param_like()
            if p is not None and u.dtype in _HALF and p.dtype not in _HALF:
                u = u.to(p.dtype)
        return u

    @torch.compiler.disable
    def _solve(self, x, u, h0, user_h0, mode, opts, mask):
        """The solve and the readout: ``(y [B, T, out], h_T [B, state], info)``. Under torch.compile
        it runs eagerly, as one graph break per call: its checks and Newton's convergence tests
        read values, and the sequential loop would be unrolled over T. Autograd records it as usual."""
        if opts.check_finite and not all_finite(x):  # (padded steps are zero by now)
            raise ValueError("x contains NaN or Inf at a valid step (pass check_finite=False to skip this check)")
        if opts.check_finite and user_h0 and not all_finite(h0):
            raise ValueError("h0 contains NaN or Inf (pass check_finite=False to skip this check)")
        C = self._chunk_size(x, h0, opts)
        if C is None:
            y, hT, info = self._solve_chunk(mode, opts, u, x, h0, mask, {}, 0)
        else:
            y, hT, info = self._solve_in_chunks(mode, opts, x, h0, mask, C)
        self.last_info = info
        self.stats.record(info)
        for hook in list(self._solve_hooks.values()):
            hook(self, info)
        return y, hT, info

    def _chunk_size(self, x, h0, opts) -> int | None:
        """Steps per solve chunk, or None for one solve over all of T."""
        C, T = opts.chunk_size, x.shape[1]
        if C is None:
            return None
        if C == "auto":
            d = self.cell.state_size
            jac = math.prod(self.cell.get_structure().storage_shape(d))
            C = auto_chunk_size(x.shape[0], T, d, jac, h0.element_size(), opts.memory_budget)
        if context_for(opts.process_group).size() > 1:  # every rank takes the same path (its collectives
            return T if C is None else min(C, T)  # differ), even where its whole part is one chunk
        return None if C is None or C >= T else C

    def _solve_chunk(self, mode, opts, u, x, h0, mask, infos: dict, i: int, transitions: dict | None = None,
                     chunked: bool = False, warm: dict | None = None):
        """One solve over ``x [B, n, D_in]`` (``u = prepare(x)``, computed here if None) from ``h0``,
        and its readout: ``(y, h_last, info)``. ``infos[i]`` keeps the first info of chunk i (a
        backward recompute does not replace it); ``transitions[i]``, if asked for, the chunk's
        transition ``dh_last/dh0 [B, *jac]`` (computed once, not again in a recompute). ``warm["init"]``,
        once set, is this chunk's solution from the forward (a view of the output buffer, with
        ``warm["version"]`` its version after the forward): the backward's recompute evaluates the
        Jacobians there instead of solving again, unless the buffer was written since. Otherwise a recompute (``infos[i]`` set) replays the
        forward's Newton steps without their convergence tests (:func:`pararnn.newton.replay_steps`):
        the same iterates, without the residual measures."""
        replay = replay_steps(infos.get(i))
        # the forward's solution is read from the output buffer the user holds: only while its
        # version counter shows no write since the forward (y += skip, relu_(y), ... change it)
        if warm and mode != "sequential" and warm["init"]._version == warm.get("version"):
            opts = dataclasses.replace(opts, init=warm["init"])
            replay = 0  # the forward's solution itself (the forward's last evaluation was there too)
        if chunked:  # one of many chunks (this also runs in the backward's recompute of the chunk)
            release_freed_memory(x.device, opts.memory_budget)
        if u is None:
            u = self._prepare(x)
        if mode == "sequential":
            H = sequential_solve(self.cell.step, u, h0, mask)
            info = SolverInfo(mode="sequential")
        else:
            keep = None
            if transitions is not None and i not in transitions:
                structure = self.cell.get_structure()
                keep = lambda J: transitions.setdefault(i, run_transition(J, structure))
            H, info = parallel_solve(self.cell, u, h0, opts, warn=self._warn_once, mask=mask, on_jacobians=keep,
                                     replay=replay)
        infos.setdefault(i, info)
        y = self.cell.output(H, x)
        if mask is not None:  # zero at padded positions
            y = y * mask[..., None].to(y.dtype)
        return y, H[:, -1].clone(), info  # a copy: a view would keep the chunk's states alive

    def _solve_in_chunks(self, mode, opts, x, h0, mask, C: int):
        """T in chunks of C steps, each prepared and solved from the previous chunk's final state.
        With gradients each chunk is a non-reentrant activation checkpoint: the forward keeps its
        inputs (a view of x and the boundary state) and its outputs only; the backward reruns the
        chunk (prepare, Newton and the graph-carrying evaluation at the solution), whose adjoint
        scan then takes the cotangent carried in from the next chunk through h_last.

        With ``process_group`` each rank chunks its own part of T; see :meth:`_solve_across_ranks`."""
        _check_prepare_is_per_step(self.cell, x)
        if context_for(opts.process_group).size() > 1:
            return self._solve_across_ranks(mode, opts, x, h0, mask, C)
        y, h, infos, _ = self._chunk_pass(mode, opts, x, h0, mask, C)
        return y, h, SolverInfo.merge([infos[i] for i in range(len(infos))])

    def _chunk_pass(self, mode, opts, x, h0, mask, C: int, transitions: dict | None = None):
        """One pass over this process's T in chunks of C from ``h0``: ``(y, h_last, infos, P)``,
        ``P`` the whole pass's transition ``dh_last/dh0 [B, *jac]`` when ``transitions`` is given."""
        from torch.utils.checkpoint import checkpoint

        infos: dict[int, SolverInfo] = {}
        y, h, P = None, h0, None
        # one split node: autograd sums every gradient x receives (a skip connection, another
        # consumer) and hands the split's backward all chunks' gradients at once, which it joins
        T = x.shape[1]
        x_chunks = x.split(C, dim=1)
        mask_chunks = (None,) * len(x_chunks) if mask is None else mask.split(C, dim=1)
        structure = self.cell.get_structure()
        # where the output is the state itself (and no step is padded), the output buffer holds each
        # chunk's solution: its recompute warm-starts from it
        warm_start = mask is None and type(self.cell).output is Cell.output and torch.is_grad_enabled()
        if mode != "sequential" and opts.check_cell and not _verified(self.cell, h0):  # the one-off cell check,
            with torch.no_grad():  # outside the checkpoints: inside one it would save tensors its recompute does not
                _verify_once(self.cell, self._prepare(x[:, :min(T, 64)]), h0)
        warms = []
        # the recompute sees the forward's parameters (only checkpointed chunks recompute)
        solve = _ForwardState(self.cell, self._solve_chunk) if torch.is_grad_enabled() else None
        for i, (x_c, m_c) in enumerate(zip(x_chunks, mask_chunks)):
            o = opts if not isinstance(opts.init, torch.Tensor) else \
                dataclasses.replace(opts, init=opts.init[:, i * C:(i + 1) * C])
            warm = {} if warm_start else None
            warms.append(warm)
            args = (mode, o, None, x_c, h, m_c, infos, i, transitions, True, warm)
            # the last chunk is not checkpointed: the backward starts with it, so its recompute would
            # be immediate and its graph costs what the recompute's would
            if torch.is_grad_enabled() and i < len(x_chunks) - 1:
                y_c, h, _ = checkpoint(solve, *args, use_reentrant=False)
            else:
                y_c, h, _ = self._solve_chunk(*args)
            if transitions is not None:  # later chunk after earlier ones
                Pc = transitions[i]
                P = Pc if P is None else compose(Pc, P, structure)
            if y is None:  # the output buffer [B, T, out]: chunks are written in as they come, no cat
                y = y_c.new_empty(x.shape[0], x.shape[1], *y_c.shape[2:])
            y = _Place.apply(y, y_c, i * C)
            if warm is not None and y_c.dtype == h.dtype:
                warm["init"] = y.detach()[:, i * C:i * C + y_c.shape[1]]  # a view: nothing is copied
            del y_c
        for warm in warms:  # the buffer's version once every chunk is in: any later write invalidates
            if warm is not None and "init" in warm:
                warm["version"] = warm["init"]._version
        return y, h, infos, P

    def _solve_across_ranks(self, mode, opts, x, h0, mask, C: int):
        """``chunk_size`` under sequence parallelism: each rank solves its own part of T in chunks
        of C, from a guess ``s`` of the state entering that part, and the ranks run Newton on those
        entering states (multiple shooting across ranks). A pass from ``s`` gives each rank its final
        state F and transition ``P = dF/ds`` (the product of its chunks' Jacobians at the solution);
        one exchange then gives ``s'_{q+1} = F_q + P_q (s'_q - s_q)`` (``s'_0 = h0``). Rank q's
        entering state is exact after q passes, so at most world_size + 1 passes run (two for a
        linear cell: its F is affine in s); the last pass, whose guesses did not move, is the
        result.

        Backward (:class:`_LinkRanks`): each rank first takes the cotangent ``g`` of its entering
        state from its own outputs alone (a backward over its chunks), one exchange turns those into
        the cotangent ``μ`` of its final state from the later ranks, ``μ_q = g_{q+1} + P_{q+1}^H
        μ_{q+1}``, and its ordinary backward then runs with μ added: two backward passes over the
        chunks, each rank in parallel."""
        pctx = context_for(opts.process_group)
        local = dataclasses.replace(opts, process_group=None)
        structure = self.cell.get_structure()
        rtol, atol = opts.tolerances(h0.dtype)
        rank0 = pctx.owns_h0()
        s = h0.detach() if rank0 else torch.zeros_like(h0)
        for passes in range(1, pctx.size() + 2):
            s_in = h0 if rank0 else s.detach().requires_grad_(torch.is_grad_enabled())
            transitions: dict[int, torch.Tensor] = {}
            y, h, infos, P = self._chunk_pass(mode, local, x, s_in, mask, C, transitions)
            with torch.no_grad():
                s_new = pctx.link_states(h.detach(), P, s, h0.detach(), structure)
                settled = ((s_new - s).abs() - rtol * s_new.abs()).amax() <= atol  # False for NaN
                if not bool(pctx.any(~settled.reshape(1))):
                    break
            s = s_new
        else:
            raise ConvergenceError(f"chunk_size with process_group: the states entering the ranks' parts did "
                                   f"not settle in {pctx.size() + 1} passes (non-finite values?)")
        info = dataclasses.replace(SolverInfo.merge([infos[i] for i in range(len(infos))]), boundary_passes=passes)
        if torch.is_grad_enabled() and (y.requires_grad or h.requires_grad):
            y, h = _LinkRanks.apply(pctx, structure, P, None if rank0 else s_in, y, h)
        return y, h, info

    @torch.no_grad()
    def solve_info(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> SolverInfo:
        """Run the parallel solver on x without autograd and return its :class:`SolverInfo`."""
        return self.forward(x, h0, mode="parallel", return_info=True)[2]

    def step(self, x_t: torch.Tensor, h: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """Decode one token: ``x_t [B, D_in]``, ``h [B, state]`` (None = zeros).

        ``mask [B]`` (bool, optional): False for sequences past their end, whose state is held
        and whose ``y_t`` is zero, as at the padded steps of ``forward(..., lengths=)``.
        Returns ``(y_t [B, out], h_next [B, state])``.
        """
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2:
            raise ValueError(f"x_t must be [B, D_in], got {getattr(x_t, 'shape', type(x_t))}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != (x_t.shape[0],)):
            raise ValueError(f"mask must be a bool tensor [B] = [{x_t.shape[0]}], got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
        x = x_t.unsqueeze(1)
        self._check_x(x)
        u = self.cell.prepare(x)
        h = self._make_h0(h, u)
        h_next = self.cell.step(h, u[:, 0])
        y = self.cell.output(h_next.unsqueeze(1), x)[:, 0]
        if mask is not None:
            keep = mask.to(x_t.device)[:, None]
            h_next = torch.where(keep, h_next, h)
            y = y * keep.to(y.dtype)
        return y, h_next
