"""Newton's method on F(H)_t = h_t - f(h_{t-1}, u_t) = 0: every iteration is one linear scan."""
from __future__ import annotations

import dataclasses
import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import fastmath
from .cell import gives_scale, uses_jvp
from .dispatch import check_backend
from .parallel import LOCAL, ParallelContext
from .workspace import Fresh


class ConvergenceError(RuntimeError):
    """Raised by ``on_fail="raise"`` when Newton does not converge for some sequences."""


class ConvergenceWarning(RuntimeWarning):
    """Issued by ``on_fail="warn"`` or ``"fallback"`` when Newton does not converge."""


# Default rtol per dtype: about 16 units of roundoff (fp32 eps = 1.2e-7), so that an iterate that
# is exact up to the rounding of one evaluation of f passes, and nothing coarser does.
_DEFAULT_RTOL = {
    torch.float64: 1e-12,
    torch.complex128: 1e-12,
    torch.float32: 2e-6,
    torch.complex64: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


@dataclass
class SolverOptions:
    """Newton solver options (all keyword arguments of :class:`pararnn.RNN`).

    Attributes:
        max_iters: most Newton steps (linear scans). Newton needs at most T; typical cells 2-10.
        rtol, atol: a sequence is converged when every entry i of every residual satisfies
            ``|r_t,i| <= atol + rtol·(max(|f_i|, s_i) + Σ_j |J_t,ij| |h_{t-1},j|)``, with
            ``r_t = f(h_{t-1}, u_t) - h_t``, J = df/dh and s the size of the terms summed into f
            where the cell gives it (:meth:`pararnn.Cell.step_jacobian_and_scale`; else 0): the
            rounding scale of the linearised step, per entry, so states of any size (1e-12 or 1e6, or both in one state) are
            solved to the same relative accuracy. ``None`` = defaults: rtol per dtype (fp64
            1e-12, fp32 2e-6, fp16 2e-3, bf16 1e-2); atol = the dtype's smallest normal number
            (so no state is small enough to pass unsolved).
        init: initial guess: ``"auto"`` (``"zeros"`` for a cell found affine in h by the one-off
            cell check, :func:`pararnn.cell.is_affine`, else ``"step"``), ``"step"``
            (``h_t = f(h0, u_t)`` for all t, as ParaRNN with h0=0), ``"zeros"``, or a tensor
            ``[B, T, d]`` (warm start, e.g. a previous solution). From zeros an affine cell is
            solved in one Newton step (DeltaNet 64×64, T = 8192, fp32: one step, 6.9e-7 from fp64
            against the loop's 5.3e-7); from ``"step"`` the update cancels at small entries and a
            second step refines it.
        on_fail: ``"raise"`` (ConvergenceError), ``"warn"`` (return the last iterate with a
            ConvergenceWarning) or ``"fallback"`` (recompute the non-converged sequences
            sequentially, with a warning). Non-finite iterates count as non-converged.
        shooting: window length (steps) of the multiple-shooting sweeps that take over where Newton
            stalls: when a Newton step did not halve a sequence's max residual (or blew it up),
            every window ``[cL, cL+L)`` of that sequence is re-run by the cell from the state
            entering it, all windows at once (a sequential loop of L steps over B·T/L rows), before
            the next Newton step. The windows are then exact from their starting states, and Newton
            has only the junctions to correct; a sweep carries what the linearisation cannot (a
            latch-like state that a remote input flips) a window further each time, and the Newton
            steps between sweeps settle the contractive directions at once. Windows are L, L, 2L,
            4L, …: after ⌈log2(T/L)⌉ + 2 sweeps one spans all of T and is the sequential loop
            itself. ``"auto"``: L = 256 steps (T/4 when T < 1024); an int: that L; None: plain
            Newton. ``info.sweeps`` counts them. Sweeps are extra work, not Newton steps:
            ``max_iters`` bounds the Newton steps (one sweep at most before each).
        damping: step size in (0, 1]: ``H += damping * delta``. Below 1 it trades speed for
            robustness on non-contractive cells.
        jacobian_clip: bound every J_t (diagonal entries to [-c, c]; blocks/dense to infinity
            norm c) before the scan: a quasi-Newton step that cannot blow up through products of
            Jacobians. Newton still makes at least one more position exact per step, so it still
            converges within T steps; quadratic convergence is lost where clipping is active.
        safeguard: undo a step for the sequences it blew up (NaN/Inf, or residual 1e4× its best
            so far) and continue those in a trust region: exact Jacobians, each update entry at
            most the size of its state row; a sequence that diverges there too (residual 100× its
            best) restarts from its best iterate with Jacobians clipped to 0.9 (see
            :class:`StepPolicy`; ``info.safeguarded`` says so).
        backend: linear-scan backend (see :func:`pararnn.linear_scan`).
        check_finite: raise on NaN/Inf in x or h0 before solving.
        chunk_size: solve T in consecutive chunks of this many steps (None: all of T at once).
            Each chunk is solved (in parallel, or by the loop) from the previous chunk's final
            state; the forward keeps only the chunk-boundary states and the outputs, and the
            backward recomputes one chunk at a time (its states and Jacobians) and runs its adjoint
            scan, so memory is O(B·T·output + B·chunk_size·(state + Jacobian)) with exact
            gradients. ``"auto"``: the largest multiple of 64 steps whose solver buffers fit
            ``memory_budget`` (see :func:`pararnn.newton.auto_chunk_size`); no chunking if all of
            T fits. A chunk also bounds Newton's work on hard cells: Newton is exact after at
            most ``chunk_size`` steps. With ``process_group`` each rank chunks its own part, and
            the ranks settle the states entering their parts by Newton (``info.boundary_passes``).
        memory_budget: bytes for one chunk's solver buffers under ``chunk_size="auto"`` (1 GiB).
        eval_chunk: the cell is evaluated over T in pieces of about this many state elements, so
            temporaries stay small (a CPU speed knob; results do not depend on it). Compiled
            evaluations (``compile_cell``) use pieces up to 4× larger (``COMPILED_CHUNK_FACTOR``),
            one sequence each where a sequence holds ``eval_chunk / 2`` elements or more
            (:func:`pararnn.newton.pieces_for`).
        compile_cell: evaluate the cell in each Newton step through ``torch.compile`` (inductor,
            dynamic batch and time sizes): ``step_and_jacobian``, the residual and the convergence
            reductions fused into one loop per evaluation piece that stores r and J straight into
            the solver's buffers (:func:`pararnn.newton.compiled_piece`); the initial guess and the
            graph-carrying evaluation at the solution (its forward and its vjp, for the backward) too.
            Its ``torch.tanh`` is :func:`pararnn.fastmath.tanh` (2.4× faster on CPU, within 2 ulp;
            the eager path keeps torch's). Compiled once per cell class, parameter shapes,
            structure, dtype and device (a few seconds on CPU), not per call, B or T; real dtypes
            only (complex cells stay eager). Past torch._dynamo's recompile limit (8 variants) it
            runs eagerly, as dynamo does. Cells without a hand-written ``step_and_jacobian``
            (torch.func.jvp) compile again for every new (B, T) (:func:`warn_jvp_recompiles`).
            Off by default (the compile time); ``mode="auto"`` takes it into account
            (:func:`pararnn.choose_mode`); see the README's benchmark for where it wins.
        check_cell: on the first parallel call per cell, dtype and device, probe ``step`` at a
            few positions (:func:`pararnn.cell.verify_cell`: determinism, no coupling of batch
            rows, the declared structure, holomorphy of complex cells) and raise a clear error
            if it breaks an assumption of the solver. Costs a few evaluations of ``step`` once.
        process_group: a ``torch.distributed`` group for sequence parallelism: each rank passes
            its own time chunk of x (in rank order), see :mod:`pararnn.distributed`. The
            ``"fallback"`` policy is not available there (non-convergence raises instead).
    """

    max_iters: int = 30
    rtol: float | None = None
    atol: float | None = None
    init: str | torch.Tensor = "auto"
    on_fail: str = "fallback"
    shooting: int | str | None = "auto"
    damping: float = 1.0
    jacobian_clip: float | None = None
    safeguard: bool = True
    backend: str = "auto"
    check_finite: bool = True
    chunk_size: int | str | None = None
    memory_budget: int = 1 << 30
    eval_chunk: int = 1 << 18
    process_group: object = None
    check_cell: bool = True
    compile_cell: bool = False

    def __post_init__(self):
        if not isinstance(self.max_iters, int) or self.max_iters < 1:
            raise ValueError(f"max_iters must be an int >= 1, got {self.max_iters!r}")
        if self.on_fail not in ("raise", "warn", "fallback"):
            raise ValueError(f"on_fail must be 'raise', 'warn' or 'fallback', got {self.on_fail!r}")
        if not (0.0 < float(self.damping) <= 1.0):
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")
        if isinstance(self.init, str) and self.init not in ("auto", "step", "zeros"):
            raise ValueError(f"init must be 'auto', 'step', 'zeros' or a tensor, got {self.init!r}")
        if self.shooting is not None and self.shooting != "auto" and (
                isinstance(self.shooting, bool) or not isinstance(self.shooting, int) or self.shooting < 1):
            raise ValueError(f"shooting must be None, 'auto' or an int >= 1 (window length), got {self.shooting!r}")
        if not isinstance(self.eval_chunk, int) or self.eval_chunk < 1:
            raise ValueError(f"eval_chunk must be an int >= 1, got {self.eval_chunk!r}")
        if self.chunk_size is not None and self.chunk_size != "auto" and (
                isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be None, 'auto' or an int >= 1, got {self.chunk_size!r}")
        if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, int) or self.memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive int (bytes), got {self.memory_budget!r}")
        if self.jacobian_clip is not None and not self.jacobian_clip > 0:
            raise ValueError(f"jacobian_clip must be > 0, got {self.jacobian_clip!r}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        check_backend(self.backend)
        if self.process_group is not None and not isinstance(self.process_group, ParallelContext):
            import torch.distributed as dist

            if not (dist.is_available() and isinstance(self.process_group, dist.ProcessGroup)):
                raise TypeError("process_group must be a torch.distributed ProcessGroup or a "
                                f"pararnn.parallel.ParallelContext, got {type(self.process_group).__name__}")
        if isinstance(self.max_iters, bool):
            raise TypeError(f"max_iters must be an int >= 1, got {self.max_iters!r}")
        for name in ("safeguard", "check_finite", "check_cell", "compile_cell"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        rtol = _DEFAULT_RTOL.get(dtype, 1e-5)
        atol = torch.finfo(dtype).tiny if not dtype.is_complex else torch.finfo(dtype.to_real()).tiny
        return (rtol if self.rtol is None else self.rtol, atol if self.atol is None else self.atol)


@dataclass
class SolverInfo:
    """What the last solve did. ``rnn.last_info`` after every forward.

    Attributes:
        mode: ``"parallel"`` or ``"sequential"``.
        iterations: Newton steps taken (linear scans); 0 for sequential mode.
        residuals: max residual over the batch before each step and after the last one
            (length ``iterations + 1``).
        converged: ``[B]`` bool, which sequences met the tolerance by Newton.
        fell_back: ``[B]`` bool, which sequences were recomputed sequentially.
        rtol, atol: the tolerance applied (see :class:`SolverOptions`).
        safeguarded: whether the safeguard had to undo a step (see ``SolverOptions.safeguard``).
        sweeps: multiple-shooting sweeps taken where Newton stalled (see ``SolverOptions.shooting``);
            each is a sequential loop of ``shooting_window`` steps over all windows at once.
        shooting_window: their window length (None: no sweeps were allowed).
        chunks: with ``chunk_size``, each time chunk's own info.
        boundary_passes: with ``chunk_size`` and ``process_group``, how many passes over its part
            each rank made until the states entering the ranks' parts settled (the last one is
            the result; the other fields describe it).
    """

    mode: str
    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    converged: torch.Tensor | None = None
    fell_back: torch.Tensor | None = None
    rtol: float | None = None
    atol: float | None = None
    safeguarded: bool = False
    sweeps: int = 0
    shooting_window: int | None = None
    chunks: list["SolverInfo"] | None = None
    boundary_passes: int | None = None

    @property
    def all_converged(self) -> bool:
        return self.converged is None or bool(self.converged.all())

    @staticmethod
    def merge(infos: list["SolverInfo"]) -> "SolverInfo":
        """One info for a solve in time chunks (``chunk_size``): the worst chunk's iterations and
        residuals, a sequence converged if it did in every chunk and fell back if it did in any;
        ``chunks`` keeps each chunk's own info."""
        worst = max(infos, key=lambda i: i.iterations)
        if infos[0].mode != "parallel":
            return dataclasses.replace(infos[0], chunks=infos)
        conv = torch.stack([i.converged for i in infos]).all(0)
        fell = torch.stack([i.fell_back for i in infos]).any(0)
        return dataclasses.replace(worst, converged=conv, fell_back=fell,
                                   safeguarded=any(i.safeguarded for i in infos),
                                   sweeps=max(i.sweeps for i in infos), chunks=infos)


def auto_chunk_size(B: int, T: int, d: int, jac_numel: int, itemsize: int, budget: int) -> int | None:
    """``chunk_size="auto"``: the largest multiple of 64 steps (at least 64) whose solver buffers,
    estimated as ``B · itemsize · 8 · (d + jac_numel)`` bytes per step (states, residuals, Newton
    update, Jacobians, the graph of the final evaluation and the adjoint), fit ``budget``; None
    (no chunking) when all of T fits."""
    per_step = B * itemsize * 8 * (d + jac_numel)
    steps = budget // max(1, per_step)
    if steps >= T:
        return None
    return max(64, steps // 64 * 64)


def sequential_solve(step: Callable, u: torch.Tensor, h0: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """The strong sequential loop: ``h_t = step(h_{t-1}, u_t)`` over ``u.unbind(1)``.

    u: ``[B, T, *]``, h0: ``[B, d]``, mask: ``[B, T]`` bool or None (False = a padded step, which
    keeps the state). Returns ``[B, T, d]``. Differentiable by plain autograd.
    """
    h = h0
    out = []
    for t, u_t in enumerate(u.unbind(1)):
        h = hold_padded(step(h, u_t), None, h, None if mask is None else mask[:, t], None)[0]
        out.append(h)
    return torch.stack(out, dim=1)


def shooting_window(option: int | str | None, T: int) -> int | None:
    """The window length of multiple-shooting sweeps for a solve of T steps (``SolverOptions.shooting``)."""
    if option is None:
        return None
    if option == "auto":
        return AUTO_SHOOTING_WINDOW if T >= 4 * AUTO_SHOOTING_WINDOW else max(1, T // 4)
    return min(int(option), T)


# "auto" first window of the multiple-shooting sweeps. A sweep costs ~L sequential steps (over T/L
# rows at once), and a state that only a sweep can settle moves one window per sweep, each sweep
# followed by a Newton step. Measured on ParaGRU a_std 2.0 (B = 1, T = 4096, d = 64, fp32) with fixed
# windows: L = 64, 128 and 256 took 24, 14 and 9 Newton steps for about the same sequential depth in
# all; 256 growing as L, L, 2L, ... took 5 (the windows grow so that a long memory costs O(log)
# rounds, not O(memory / L)).
AUTO_SHOOTING_WINDOW = 256
# A Newton step that leaves a sequence's max residual above this fraction of the one before it has
# stalled there (quadratic convergence divides it by far more; a step that blows up and is undone
# leaves it where it was), and a sweep goes first before its next step.
SWEEP_STALL = 0.5


def shooting_sweep(step: Callable, S: torch.Tensor, u: torch.Tensor, L: int,
                   mask: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
    """One multiple-shooting sweep, in place: every window ``[cL, cL+L)`` of the iterate is re-run by
    the cell from the state entering it, all windows of all (or the chosen) sequences at once.

    ``S [B, T+1, d]`` holds (h0, h_1..h_T) (window c starts from ``S[:, cL]``), ``u [B, T, *]``,
    ``mask [B, T]`` or None (padded steps hold the state), ``rows`` a 1-D index of the sequences to
    sweep (None: all; only their steps are gathered, never whole rows of u or S). A loop of L steps
    over ``[R·⌈T/L⌉, d]`` rows (R sequences); afterwards the residual is zero inside every window (up
    to rounding) and only the junctions ``t = cL`` (c ≥ 1) carry one: window c is exact once the
    state entering it is, so sweeps alone are exact after ⌈T/L⌉ of them.
    """
    T = u.shape[1]
    d = S.shape[-1]
    n = -(-T // L)
    sel = slice(None) if rows is None else rows  # basic slicing first, then the rows: small gathers
    h = S[:, 0:T:L][sel]  # [R, n, d]: the states entering the windows (a copy)
    R = h.shape[0]
    h = h.reshape(R * n, d)
    for k in range(L):
        nk = -(-(T - k) // L)  # windows that still have a step k (only the last can be shorter)
        if nk < n:
            h, n = h.view(R, n, d)[:, :nk].reshape(R * nk, d), nk
        uk = u[:, k::L][sel, :n]  # [R, n, *]: step k of every window
        hk = step(h, uk.reshape(R * n, *uk.shape[2:]))
        if mask is not None:
            hk = hold_padded(hk, None, h, mask[:, k::L][sel, :n].reshape(R * n), None)[0]
        S[:, 1 + k::L][sel, :n] = hk.view(R, n, d)
        h = hk


def hold_padded(f: torch.Tensor, J: torch.Tensor | None, hp: torch.Tensor, m: torch.Tensor | None, structure):
    """Padded steps keep the state: ``f = h_prev`` and ``J = I`` where the mask ``m [N]`` is False.

    ``f, hp [N, d]``, ``J [N, *jac]`` (or None). In the scan that is the identity transition.
    """
    if m is None:
        return f, J
    f = torch.where(m[:, None], f, hp)
    if J is not None:
        eye = structure.identity(hp.shape[-1], J.dtype, J.device)
        J = torch.where(m.reshape(-1, *[1] * (J.dim() - 1)), J, eye)
    return f, J


def evaluate(cell, S: torch.Tensor, u: torch.Tensor, r: torch.Tensor, J: torch.Tensor,
             chunk: int, atol: float = 0.0, structure=None, mask: torch.Tensor | None = None,
             compiled: bool = False, measure: bool | str = True,
             variant: bool | str | None = None, plans: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Residual and Jacobian at the iterate, written into buffers, chunk by chunk over T.

    ``S [B, T+1, d]`` holds (h0, h_1..h_T); ``u [B, T, *]``. Fills ``r = f(h_{t-1}, u_t) - h_t``
    ``[B, T, d]`` and ``J [B, T, *jac]`` (both contiguous: pieces are written through views of
    them, see :func:`contiguous_pieces`; ``mask [B, T]``: padded steps hold the state, see
    :func:`hold_padded`). Returns per sequence ``[B]``: ``max|r|`` and
    ``q = max((|r_t| - atol)₊ / scale_t)``: the sequence passes ``|r| <= atol + rtol·scale``
    exactly when ``q <= rtol``. The per-entry scale ``max(|f_t|, s_t) + |J_t| |h_{t-1}|`` (a
    matvec of absolute values; s from :meth:`pararnn.Cell.step_jacobian_and_scale`, None: |f|
    alone) is the size of what rounds when f is evaluated, including terms of the linear part that
    cancel (a h + b can be ~0 from large terms) and, with s, terms of f that cancel. Per entry and per position, so
    neither a large entry of the same state, nor a blown-up iterate elsewhere (|h| ~ 1e250), can
    make a residual pass that is garbage at the small entries; a scale that multiplies J also
    keeps a saturated blown-up entry (J ≈ 0) from inflating it. NaN residuals give q = NaN.

    ``compiled=True`` runs each chunk through :func:`evaluate_piece` compiled by torch.compile
    (one fused pass, see :func:`compiled_piece`); otherwise eagerly (the reference twin).
    ``measure``: True returns both, ``"err"`` only ``max|r|`` (q is None: the scale's pass is
    skipped), False neither (r and J only). ``variant``: which compiled variant (a ``measure``
    value) computes r and J; by default ``measure``, or True where ``measure`` is False. Variants
    are separate fused loops that could round r and J differently, so a replay
    (:func:`newton_solve`) passes the variant of each evaluation of the solve it repeats.
    ``plans``: a dict that one solve passes to each of its evaluations (the same u, r, J and mask,
    S one of its iterate buffers): the pieces' argument views are built once per S, not per call
    (~20 µs a piece).
    """
    B = u.shape[0]
    structure = cell.get_structure() if structure is None else structure
    piece = compiled_piece(evaluate_piece, cell) if compiled and can_compile(S) else evaluate_piece
    eager = piece is evaluate_piece
    if eager:
        variant = measure
    elif variant is None:
        variant = measure if measure else True
    plan = None if plans is None else plans.get(id(S))
    if plan is None:
        plan = piece_plan(S, u, r, J, mask, structure, chunk, eager)
        if plans is not None:
            plans[id(S)] = plan
    es, qs = [], []
    for args in plan:
        e, qc = piece(cell, structure, *args[:4], atol, *args[4:], variant)
        es.append(e)
        qs.append(qc)
    if not measure:
        return None, None
    if len(es) == 1:  # one piece: its own measures (no cat: small ops cost µs each)
        return es[0], (qs[0] if measure is True else None)
    # Pieces are in (b, t) order: whole rows give [B] at once, a row's time spans its span maxima
    # (NaN propagates: amax does).
    err = torch.cat(es)
    err = err if err.shape[0] == B else err.view(B, -1).amax(1)
    if measure is not True:
        return err, None
    q = torch.cat(qs)
    return err, (q if q.shape[0] == B else q.view(B, -1).amax(1))


def piece_plan(S, u, r, J, mask, structure, chunk: int, eager: bool) -> list[tuple]:
    """The arguments of :func:`evaluate`'s pieces, in (b, t) order: ``(hp, u, hn, m, r_out, J_out)``
    views per piece (detached, feature sizes marked static for a compiled piece)."""
    B, T = u.shape[:2]
    d = S.shape[-1]
    # A piece holds about `chunk` state elements, and at most 2·chunk Jacobian entries: a dense d×d
    # Jacobian is d× its state, and pieces sized by the state alone made a dense GRU's (d = 176,
    # B = 16) temporaries 184 MB each, page-faulted afresh on every operation (4.2× slower training
    # steps). Block(2) pieces (Jacobian 2× the state) measured faster at 2·chunk than at chunk.
    per_step = max(d, math.prod(structure.storage_shape(d)) // 2)
    plan = []
    for b0, b1, t0, t1 in pieces_for(B, T, per_step, chunk, not eager):
        m = None if mask is None else mask[b0:b1, t0:t1]
        # detach: u may require grad (training) and is read here without a graph; one compiled graph then
        # serves training and inference
        N = (b1 - b0) * (t1 - t0)
        hp, uc, hn = S[b0:b1, t0:t1], u[b0:b1, t0:t1].detach(), S[b0:b1, t0 + 1:t1 + 1]
        # view, never a copy: the piece writes r and J here
        rc, Jc = r[b0:b1, t0:t1].view(N, d), J[b0:b1, t0:t1].view(N, *J.shape[2:])
        if not eager:  # detached: no view base for dynamo to guard on (the buffers' own B, 0/1-specialised)
            hp, hn, rc, Jc = hp.detach(), hn.detach(), rc.detach(), Jc.detach()
            m = None if m is None else m.detach()
            static_features(2, hp, uc, hn)
            static_features(1, rc, Jc)
        plan.append((hp, uc, hn, m, rc, Jc))
    return plan


def contiguous_pieces(B: int, T: int, per_step: int, target: int) -> list[tuple[int, int, int, int]]:
    """Split ``[B, T]`` into pieces ``(b0, b1, t0, t1)`` of about ``target`` elements (``per_step``
    per time step) that are contiguous in a ``[B, T, ...]`` buffer: whole rows, as many as fit,
    when a row fits; else one row at a time, in time chunks. So a piece's outputs are one run of
    memory, the same iteration space as its ``[N, d]`` computation, and a compiled piece stores
    r and J straight into the solver's buffers in the loop that computes them (B-row pieces with
    a time slice gave inductor a second loop nest over ``[B, n·d]`` and temporaries to copy)."""
    row = T * per_step
    if row <= target:
        return [(b0, b1, 0, T) for b0, b1 in _even_split(B, max(1, target // max(1, row)))]
    spans = _even_split(T, max(1, target // max(1, per_step)))
    return [(b, b + 1, t0, t1) for b in range(B) for t0, t1 in spans]


def _even_split(n: int, most: int) -> list[tuple[int, int]]:
    """[0, n) in the fewest spans of at most ``most``, of near-equal lengths (so no stub of length 1
    at the end, which dynamo would compile a graph of its own for)."""
    k = -(-n // most)
    bounds = [n * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def evaluate_piece(cell, structure, hp: torch.Tensor, u: torch.Tensor, hn: torch.Tensor, m: torch.Tensor | None,
                   atol: float, r_out: torch.Tensor, J_out: torch.Tensor, measure: bool | str = True):
    """One piece of :func:`evaluate`: ``hp, hn [B, n, d]`` (previous and current states),
    ``u [B, n, *]``, ``m [B, n]`` or None. Writes ``r`` into ``r_out [B·n, d]`` and ``J`` into
    ``J_out [B·n, *jac]`` (views of the solver's buffers, rows in (b, t) order) and returns
    ``(max|r| [B], q [B])``; ``(max|r|, None)`` with ``measure="err"``, ``(None, None)`` with
    ``measure=False``."""
    B, n, d = hp.shape
    N = B * n
    hp = hp.reshape(N, d)  # [N, d]
    u = u.reshape(N, *u.shape[2:])
    s = None
    if measure is True:  # the test reads the cell's rounding scale s [N, d] too (or None)
        f, Jc, s = cell.step_jacobian_and_scale(hp, u)
    else:
        f, Jc = cell.step_and_jacobian(hp, u)
    m = None if m is None else m.reshape(N)
    f, Jc = hold_padded(f, Jc, hp, m, structure)
    # Everything runs over the same [N, d] rows as the outputs, reduced per row and then per
    # sequence: one iteration space, which inductor fuses into one loop nest, stores included.
    # (out= would break dynamo's graph.)
    J_out.copy_(Jc)
    if torch.compiler.is_compiling():
        r_out.copy_(f - hn.reshape(N, d))
    else:
        torch.sub(f, hn.reshape(N, d), out=r_out)
    if not measure:
        return None, None
    ra = r_out.abs()
    err = ra.amax(dim=-1).reshape(B, n).amax(dim=1)  # [B]; amax propagates NaN
    if measure == "err":
        return err, None
    # the rounding scale of the linearised step, per entry: |J| |h_prev| + max(|f|, s)  [N, d]
    size = f.abs()
    if s is not None:  # padded steps (f = h_prev, J = I) keep the plain scale
        size = torch.maximum(size, s if m is None else torch.where(m[:, None], s, 0))
    scale = structure.matvec(J_out.abs(), hp.abs()).add_(size).clamp_min_(torch.finfo(ra.dtype).tiny)
    q = ra.sub_(atol).clamp_min_(0).div_(scale).amax(dim=-1).reshape(B, n).amax(dim=1)
    return err, q


_COMPILED = {}
# A compiled evaluation (or initial guess) of one sequence's piece is one fused loop that stores r
# and J in place, with no temporaries of the piece's size (a piece of several sequences compiles
# into three passes with temporaries: without duck shapes each input has its own symbolic sizes;
# telling dynamo they are equal fused it, but the fused loop ran slower, see the README), so its
# pieces are this many times eval_chunk: fewer calls, each paying ~0.05-0.15 ms of dynamo guards
# and wrappers. Measured (ParaGRU, compiled evaluate alone, medians of 15 interleaved, AMD EPYC
# VM), pieces of 2^18 / 2^20 / 2^21 state elements: B = 1, T = 16384, d = 64: 3.61 / 3.07 /
# 3.10 ms (1 thread), 3.03 / 2.25 / 2.37 ms (2 threads); B = 8, T = 4096, d = 256: 26.8 / 24.0 /
# 29.3 ms and 15.6 / 12.4 / 24.9 ms (larger pieces fall out of cache).
COMPILED_CHUNK_FACTOR = 4


# ... and a sequence of at least eval_chunk / ONE_ROW_DIVISOR state elements is a compiled piece of
# its own (one fused loop and a call more) rather than a row of a several-sequence piece (three
# passes). Measured (ParaGRU forward, compile_cell, d = 256, 1 thread, medians of 15 interleaved,
# AMD EPYC VM), several rows per piece against one: rows of 2^18 elements (B = 8, T = 1024) 77.1 /
# 71.7 ms against 70.1 / 66.0 (two runs; 46.3 against 41.4 at 2 threads), rows of 2^17 (B = 16,
# T = 512) 69.9 against 66.9, rows of 2^16 (B = 32, T = 256) 70.1 against 74.2 (the calls cost more
# there than the fusion saves).
ONE_ROW_DIVISOR = 2


def pieces_for(B: int, T: int, per_step: int, eval_chunk: int, compiled: bool) -> list[tuple[int, int, int, int]]:
    """The pieces (:func:`contiguous_pieces`) of an evaluation or initial guess: about ``eval_chunk``
    state elements, or :data:`COMPILED_CHUNK_FACTOR` times that for a compiled piece, which holds one
    sequence whenever a sequence has ``eval_chunk / ONE_ROW_DIVISOR`` elements or more."""
    if not compiled:
        return contiguous_pieces(B, T, per_step, eval_chunk)
    target = eval_chunk * COMPILED_CHUNK_FACTOR
    if T * per_step * ONE_ROW_DIVISOR >= eval_chunk:
        target = min(target, T * per_step)
    return contiguous_pieces(B, T, per_step, target)


def compiled_piece(fn, cell=None):
    """``fn`` (:func:`evaluate_piece`, :func:`step_piece` or :func:`graph_piece`) under
    ``torch.compile(dynamic=True)`` (inductor: one fused C++/OpenMP loop on CPU, Triton on CUDA).
    Dynamic batch and time sizes, so T and B do not recompile (feature sizes are static, see
    :func:`static_features`); dynamo compiles once per cell class, parameter shapes (parameters
    are static), structure, dtype and device, and kind of piece (several whole rows, one whole
    row, one row's span of steps: :func:`contiguous_pieces`; a size of 1 is specialised), not per
    call, B or T. The backend (:func:`pararnn.fastmath.compile_backend`) swaps tanh for the fast one.

    Each cell class (``type(cell)``) gets its own copy of ``fn``'s code, and so its own dynamo
    cache and recompile budget: :data:`RECOMPILE_LIMIT` graphs, or dynamo's own limit for a cell
    whose Jacobian comes from torch.func.jvp (which compiles again per (B, T), seconds each, see
    :func:`warn_jvp_recompiles`). With one shared budget (dynamo's 8 per code object), a few
    cells, layer sizes or dtypes used it up and every later evaluation ran eagerly, with only
    dynamo's log line to say so (``benchmarks/bench_auto.py``: the dense GRU, timed after ParaGRU
    and ParaLSTM, ran its compile_cell solve eagerly)."""
    kind = None if cell is None else type(cell)
    if (fn, kind) not in _COMPILED:
        own = fn if kind is None else types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                                           fn.__defaults__, fn.__closure__)
        compiled = torch.compile(own, dynamic=True, backend=fastmath.compile_backend)
        # Without duck shapes: the pieces are views at many storage offsets, and dynamo would
        # otherwise guard on chance equalities between offsets and sizes (hn.storage_offset()
        # == d), recompiling for new pieces until its limit and then running eagerly. Patch
        # objects made once, re-entered on every call (each patch() call builds a class: ~20 µs).
        no_duck_shapes = torch.fx.experimental._config.patch(use_duck_shape=False)
        limit = torch._dynamo.config.recompile_limit if uses_jvp(cell) else max(
            RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
        budget = torch._dynamo.config.patch(recompile_limit=limit)

        def run(*args):
            with no_duck_shapes, budget:
                return compiled(*args)

        _COMPILED[(fn, kind)] = run
    return _COMPILED[(fn, kind)]


# Graphs one compiled piece function may hold per cell class (dynamo's default is 8 per code
# object): its variants (3 measures), kinds of piece (3, with and without a padding mask), dtypes
# and parameter shapes (one per layer size) multiply. ParaGRU at two state sizes, with and
# without gradients, held 6 evaluation graphs.
RECOMPILE_LIMIT = 64


def static_features(first: int, *tensors: torch.Tensor) -> None:
    """Mark the feature dims (``first`` on) of these inputs static for dynamo; the batch and time
    dims before them stay dynamic. Under ``dynamic=True`` a cell's ``u.chunk(3, -1)`` of a symbolic
    width gave inductor loops of different symbolic lengths, which it would not fuse (7 passes
    with temporaries for ParaGRU)."""
    for t in tensors:
        for dim in range(first, t.dim()):
            torch._dynamo.mark_static(t, dim)


def warn_jvp_recompiles(cell) -> None:
    """Warn (called once per compiled solve) that the compiled evaluation of a cell whose Jacobian
    comes from :func:`pararnn.cell.autodiff_step_and_jacobian` (the default
    ``Cell.step_and_jacobian``) compiles again for every new piece size: under torch.compile,
    torch 2.13's forward-mode AD specialises the number of rows (even ``jvp`` of ``sigmoid(2 h)``
    guards on it; dynamic and unbacked sizes alike), so dynamic shapes cannot hold there. Once
    per cell class: Python's registry alone would repeat it, as dynamo's compiles reset it."""
    kind = type(cell)
    if not uses_jvp(cell) or kind in _WARNED_JVP:
        return
    _WARNED_JVP.add(kind)
    warnings.warn(JVP_RECOMPILE_MSG.format(name=kind.__name__), UserWarning, stacklevel=3)


_WARNED_JVP: set = set()
JVP_RECOMPILE_MSG = (
    "pararnn: compile_cell with {name}, whose Jacobian comes from torch.func.jvp (no hand-written "
    "step_and_jacobian): torch.compile specialises forward-mode AD on the number of rows, so each new "
    "(B, T) compiles the evaluation again (seconds each; past torch._dynamo's recompile limit it runs "
    "eagerly). Keep (B, T) fixed, write step_and_jacobian by hand, or leave compile_cell off.")


def can_compile(t: torch.Tensor) -> bool:
    """The compiled evaluation covers real floating dtypes (complex cells run eagerly)."""
    return t.dtype.is_floating_point


# A sequence whose residual is within ROUNDING_FLOOR·rtol·scale everywhere, and that the last
# Newton step could not shrink by STALL_RATIO, sits at the rounding floor of evaluating f (terms
# of f that cancel, which |f| + |J||h| does not see): more steps only hover there. Measured on
# ParaGRU B=8, T=256, d=256 fp32: max residual 1.8e-7, 1.5e-7, 1.3e-7 over the 3rd-5th steps
# with the strict test alone, and the same error against fp64 as stopping after the 3rd; with its
# own rounding scale, Cell.step_jacobian_and_scale, ParaGRU now passes the strict test there. (Stopping
# on a predicted next correction instead saved that step but left errors of 2.6e-5 in fp32 on a
# block cell, against the 1e-5 the tests demand: rejected.)
ROUNDING_FLOOR = 16.0
STALL_RATIO = 0.5


class StepPolicy:
    """The safeguard and Jacobian clipping between Newton steps (see ``SolverOptions``).

    A step that blows a sequence up (NaN/Inf, or residual :data:`BLOWUP_FACTOR` × its best so far)
    is undone for that sequence, and the sequence goes on more carefully, in two levels:

    1. a trust region (:meth:`limit`): each entry of its Newton update is at most
       :data:`TRUST_RADIUS` times the size of its state row at the restored iterate
       (``max_t max(|h_t,i|, |f_t,i|)``, fixed from then on); where the scan overflowed the update
       is cut to that radius (Inf) or to 0 (NaN). The Jacobians stay exact: near the solution the
       step is Newton's (quadratic convergence), and it still makes one more position exact per step.
    2. if it blows up again: its Jacobians are also clipped to :data:`SAFEGUARD_CLIP` (a
       quasi-Newton step that cannot amplify through products of J).
    """

    def __init__(self, opts: SolverOptions, structure, atol: float, ws=None):
        self.safeguard, self.structure, self.atol = opts.safeguard, structure, atol
        self.ws = Fresh if ws is None else ws
        self.clip = opts.jacobian_clip
        self.H_prev = self.best = None
        self.level = None  # [B] int: 0 plain, 1 trust region, 2 trust region and clipped Jacobians
        self.radius = None  # [B, 1, d]: trust radius per state row (Inf: none yet)
        self.any_trusted = self.any_clipped = False  # whether some sequence is at level 1 / 2
        self.safeguarded = False

    def blown(self, err: torch.Tensor) -> torch.Tensor | None:
        """After a step: ``[B]`` bool, the sequences it blew up (NaN/Inf, or a residual far above
        their best so far), on the device (no synchronisation); None where nothing can be undone."""
        if not self.safeguard or self.H_prev is None:
            return None
        factor = torch.full_like(err, BLOWUP_FACTOR)
        if self.level is not None:  # in the trust region, a residual that grows steadily is divergence too
            factor = torch.where(self.level == 1, TRUSTED_BLOWUP_FACTOR, factor)
        return ~torch.isfinite(err) | (err > factor * self.best.clamp_min(self.atol))

    def restore(self, blown: torch.Tensor, H: torch.Tensor) -> None:
        """Restore the previous iterate of the ``blown [B]`` sequences (the best one so far for a
        sequence that blew up in the trust region), and take them a level more carefully."""
        if self.level is None:
            self.level = torch.zeros_like(blown, dtype=torch.int8)
            self.H_best = self.H_prev.clone()  # from now on the best iterate of each sequence is kept
        H[blown] = torch.where((self.level[blown] == 1).reshape(-1, 1, 1), self.H_best[blown], self.H_prev[blown])
        self.level[blown] = (self.level[blown] + 1).clamp_max(2)
        # host copies: the steps read them without a synchronisation each
        self.any_trusted, self.any_clipped = (bool(v) for v in torch.stack([(self.level == 1).any(),
                                                                             (self.level == 2).any()]).tolist())
        self.safeguarded = True

    def record(self, err: torch.Tensor, H: torch.Tensor) -> None:
        if self.level is not None:
            better = err < self.best
            self.H_best[better] = H[better]
        self.best = err if self.best is None else torch.minimum(self.best, err)

    def before_scan(self, J: torch.Tensor) -> None:
        if self.clip is not None:
            self.structure.clip(J, self.clip)
        if self.any_clipped:
            idx = (self.level == 2).nonzero().flatten()
            Jb = J[idx]
            self.structure.clip(Jb, SAFEGUARD_CLIP)
            J[idx] = Jb

    def keeps_updates(self) -> bool:
        """Whether :meth:`limit` would leave every Newton update as it is (no sequence in its trust
        region), so the update can go straight into the next iterate."""
        return not self.any_trusted

    def limit(self, delta: torch.Tensor, H: torch.Tensor, r: torch.Tensor) -> None:
        """In place: hold the update ``delta [B, T, d]`` of safeguarded sequences in their trust region;
        ``H``, ``r`` are the iterate and its residual (the radius is set at the first call after a blow-up)."""
        if not self.any_trusted:
            return
        idx = (self.level == 1).nonzero().flatten()
        if idx.numel() == 0:
            return
        if self.radius is None:
            self.radius = torch.full((H.shape[0], 1, H.shape[2]), float("inf"), dtype=H.real.dtype, device=H.device)
        new = idx[torch.isinf(self.radius[idx, 0, 0])]
        if new.numel():  # the state rows' size at the restored iterate: max_t max(|h_t|, |f_t|), f = h + r
            Hn = H[new]
            size = torch.maximum(Hn.abs(), (Hn + r[new]).abs()).amax(1, keepdim=True)
            self.radius[new] = (TRUST_RADIUS * size).clamp_min(torch.finfo(size.dtype).tiny)
        every = idx.numel() == delta.shape[0]  # then in place on delta itself, no gathered copy
        db = delta if every else delta[idx]
        db.nan_to_num_(nan=0.0)  # an overflowing scan: NaN -> 0, Inf -> the dtype's max
        scale = self.ws.take("trust_scale", db.shape, db.real.dtype, db.device)  # one reused temporary
        torch.abs(db, out=scale)
        torch.div(self.radius if every else self.radius[idx], scale.clamp_min_(torch.finfo(scale.dtype).tiny), out=scale)
        db.mul_(scale.clamp_(max=1.0))
        if not every:
            delta[idx] = db

    def keep_previous(self, H_prev: torch.Tensor) -> None:
        """After a step: the iterate before it, ``H_prev [B, T, d]``, which the solver leaves
        untouched until its next step (the other of its two iterate buffers), for :meth:`restore`."""
        if self.safeguard:
            self.H_prev = H_prev


# A residual this many times a sequence's best so far means the step diverged (Newton's error
# squares each step near the solution, so an honest step never grows the residual by 10^4).
BLOWUP_FACTOR = 1e4
TRUSTED_BLOWUP_FACTOR = 100.0
# After a blow-up, a sequence's Newton updates are held to this multiple of its state rows' size.
TRUST_RADIUS = 1.0
# After a second blow-up, its Jacobians are clipped to this norm: < 1 makes every product of J_t
# a contraction, and 0.9 keeps most of the Newton direction for cells whose |J| is near 1.
SAFEGUARD_CLIP = 0.9


def max_abs(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` per sequence: ``t [B, ...] -> [B]`` (NaN propagates). For a real t, the larger of
    ``max t`` and ``-min t``: no temporary of t's size, whose fresh pages cost more than the
    reductions (``t.abs().amax()`` of a [8, 4096, 256] fp32 tensor: 16 ms, against 1.8 ms for the
    two reductions, one core of the benchmark machine)."""
    dims = tuple(range(1, t.dim()))  # reduced in place: t may be a strided view (H = S[:, 1:])
    if t.is_complex():
        return t.abs().amax(dim=dims)
    return torch.maximum(t.amax(dim=dims), t.amin(dim=dims).neg())


def initial_guess(cell, u: torch.Tensor, h0: torch.Tensor, opts: SolverOptions, H: torch.Tensor) -> bool:
    """Fill the iterate ``H [B, T, d]`` from ``opts.init``: a warm start, zeros or ``f(h0, u_t)``.
    Returns whether it was ``f(h0, u_t)``."""
    B, T, d = H.shape
    if isinstance(opts.init, torch.Tensor):
        if tuple(opts.init.shape) != (B, T, d):
            raise ValueError(f"init (warm start) must be [B, T, d] = {[B, T, d]}, got {list(opts.init.shape)}")
        H.copy_(opts.init)
        return False
    elif opts.init == "zeros" or (opts.init == "auto" and getattr(cell.__dict__.get("_pararnn_facts"), "affine", False)):
        H.zero_()
        return False
    else:  # f(h0, u_t) for every t
        compiled = opts.compile_cell and can_compile(H)
        piece = compiled_piece(step_piece, cell) if compiled else step_piece
        for b0, b1, t0, t1 in pieces_for(B, T, d, opts.eval_chunk, compiled):
            out = H[b0:b1, t0:t1]  # H = S[:, 1:]: one row's piece is one run of memory, [N, d] rows
            out = out.view((t1 - t0), d) if b1 - b0 == 1 else out
            args = (h0[b0:b1].detach(), u[b0:b1, t0:t1].detach(), out.detach())  # detached: see evaluate
            if compiled:
                static_features(1, args[0])
                static_features(out.dim() - 1, args[2])
                static_features(2, args[1])
            piece(cell, *args)
        return True


def graph_piece(cell, hp: torch.Tensor, u: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """``f(h_{t-1}, u_t)`` over a piece, with autograd's graph (the evaluation at the solution that
    carries the gradients, see :func:`pararnn.rnn.parallel_solve`): ``hp [N, d]`` previous states,
    ``u [N, *]``, ``m [N]`` or None (padded steps hold the state). Returns ``[N, d]``. Compiled
    (:func:`compiled_piece`), its forward and its vjp are one fused loop each."""
    return hold_padded(cell.step(hp, u), None, hp, m, None)[0]


def step_piece(cell, h0: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
    """``out = f(h0, u_t)`` for every step of a piece: h0 ``[B, d]``, u ``[B, n, *]``, out
    ``[B, n, d]`` or ``[B·n, d]`` (rows in (b, t) order)."""
    B, n = u.shape[:2]
    h = h0.unsqueeze(1).expand(B, n, h0.shape[-1]).reshape(B * n, h0.shape[-1])
    out.copy_(cell.step(h, u.reshape(B * n, *u.shape[2:])).reshape(out.shape))


def newton_solve(cell, u: torch.Tensor, h0: torch.Tensor, opts: SolverOptions, ctx: ParallelContext = LOCAL,
                 mask: torch.Tensor | None = None, replay: int | None = None, ws=None, outputs_from_ws: bool = False):
    """Solve ``h_t = f(h_{t-1}, u_t)``, t = 1..T, by Newton with parallel linear scans.

    u: ``[B, T, *]`` (prepared inputs), h0: ``[B, d]``, mask: ``[B, T]`` bool or None (False =
    a padded step: f = h_prev, J = I). Runs without autograd. ``ctx`` says where the scans run
    (local, or this rank's time chunk).

    Returns ``(S, J, info)``: ``S [B, T+1, d]`` holds ``(h0, h_1..h_T)`` (so ``S[:, 1:]`` is the
    solution and ``S[:, :-1]`` the previous states), ``J [B, T, *jac]`` is df/dh at the solution
    and ``info`` a :class:`SolverInfo` (``info.converged`` says which sequences converged: the
    caller applies the failure policy, :func:`handle_failure`). J is what the adjoint backward
    needs, so the final convergence check doubles as the backward's linearisation.

    ``replay=k`` repeats a solve known to have converged in k steps from the same inputs and
    ``opts`` (a chunked backward's recompute, see :func:`replay_steps`): exactly k steps, no
    convergence tests, so no residual measures are computed; the iterates are the same numbers.

    ``ws``: a :class:`pararnn.workspace.Workspace` (held by the caller for this solve) for the
    buffers that die with the solve, and for S and J too with ``outputs_from_ws`` (the caller is
    done with them before it releases ``ws``). None: every buffer is new.
    """
    solver = NewtonSolver(cell, u, h0, opts, ctx, mask, ws, outputs_from_ws, replaying=replay is not None)
    return solver.replay(replay) if replay is not None else solver.run()


@dataclasses.dataclass
class Decision:
    """What :meth:`NewtonSolver.decide` concluded after a check: ``converged [B]``, ``stalled [B]``
    (or None: no step to compare with yet), whether to stop and why."""

    converged: torch.Tensor
    stalled: torch.Tensor | None
    stop: bool
    reason: str  # "converged", "max_iters", "non_finite" or "" (go on)


class NewtonSolver:
    """One parallel solve (see :func:`newton_solve`): its buffers, and one method per part of a
    Newton iteration: :meth:`evaluate` (r and J at the iterate), :meth:`check` (and the measures),
    :meth:`decide` (every stopping rule, and the one host synchronisation of the iteration),
    :meth:`correction_check`, :meth:`sweep` and :meth:`step`.

    Buffers are reused across iterations (fresh large tensors are page-faulted in on every
    allocation), and across calls where ``ws`` keeps them. ``S [B, T+1, d]`` holds h0 and the
    iterate: ``H = S[:, 1:]``, ``S[:, :-1] = (h0, h_1..h_{T-1})``. With the safeguard a second
    iterate buffer ``S_alt``: each step writes ``H + δ`` there and the two swap, so the previous
    iterate stays at hand to undo a step without copying it every step.
    """

    def __init__(self, cell, u, h0, opts: SolverOptions, ctx: ParallelContext = LOCAL, mask=None, ws=None,
                 outputs_from_ws: bool = False, replaying: bool = False):
        self.cell, self.u, self.h0, self.opts, self.ctx, self.mask = cell, u, h0, opts, ctx, mask
        self.structure = structure = cell.get_structure()
        B, T = u.shape[:2]
        d = cell.state_size
        self.T = T
        self.rtol, self.atol = opts.tolerances(h0.dtype)
        self.ws = Fresh if ws is None else ws
        self.out_ws = self.ws if outputs_from_ws else Fresh
        dt, dev = h0.dtype, h0.device
        self.S = self.S_out = self.out_ws.take("S", (B, T + 1, d), dt, dev)  # [B, T+1, d]
        self.S_alt = self.ws.take("S_alt", (B, T + 1, d), dt, dev) if opts.safeguard and not replaying else None
        self.r = self.ws.take("r", (B, T, d), dt, dev)  # residual [B, T, d]
        self.delta = self.ws.take("delta", (B, T, d), dt, dev)  # Newton update [B, T, d]
        self.J = self.out_ws.take("J", (B, T, *structure.storage_shape(d)), dt, dev)  # [B, T, *jac]
        self.S[:, 0] = h0
        self.H = self.S[:, 1:]
        if opts.compile_cell and can_compile(h0):
            warn_jvp_recompiles(cell)
        # From f(h0, u_t), the first iterate is exact only where f ignores its state (or T = 1): its
        # check measures max|r| (for the safeguard and the stall test) but not q, whose pass over the
        # rounding scale is a third of a compiled evaluation. Such a sequence takes one step more.
        self.first_variant = "err" if initial_guess(cell, u, h0, opts, self.H) and T > 1 else True
        self.info = SolverInfo(mode="parallel", rtol=self.rtol, atol=self.atol)
        self.plans = {}  # the evaluation pieces' views, per iterate buffer (see evaluate)
        self.policy = StepPolicy(opts, structure, self.atol, self.ws)
        self.window = self.info.shooting_window = shooting_window(opts.shooting, T)
        self.checks_correction = gives_scale(cell)

    # ------------------------------------------------------------------ the parts of an iteration
    def evaluate(self, measure=True, variant=None):
        """r and J at the iterate (and, measuring, per-sequence max|r| and q, [B] each)."""
        self.S[:, 0] = self.ctx.boundary_state(self.H, self.h0)  # a later chunk's first step reads the previous chunk's last state
        o = self.opts
        return evaluate(self.cell, self.S, self.u, self.r, self.J, o.eval_chunk, self.atol, self.structure, self.mask,
                        o.compile_cell, measure, variant, self.plans)

    def check(self, measure=True):
        """Evaluate at the iterate; per-sequence (max residual, q), global over the context."""
        err, q = self.evaluate(measure)
        inf = float("inf")  # NaN counts as the worst: never converged
        q = torch.full_like(err, inf) if q is None else torch.nan_to_num(q, nan=inf)
        return self.ctx.max(torch.nan_to_num(err, nan=inf)), self.ctx.max(q)

    def decide(self, err, q, prev, undo: bool = True) -> tuple[Decision | None, torch.Tensor | None]:
        """Every stopping rule, with one host synchronisation (one small tensor fetched):

        - a sequence converges when its residual passes ``|r| <= atol + rtol·scale`` (q <= rtol),
          or sits at the rounding floor: within ``ROUNDING_FLOOR·rtol`` and the last step could not
          shrink it by ``STALL_RATIO``;
        - it has stalled (a shooting sweep goes first) when it has not converged and the last step
          did not shrink its residual by ``SWEEP_STALL``;
        - the solve stops when every sequence converged (then :meth:`correction_check` may still
          send some on), at ``max_iters``, or when every unconverged sequence is NaN/Inf.

        ``prev [B]``: the residuals before the last step (None: none yet). Also returns the
        sequences whose last step blew them up (``[B]`` bool, with no decision: undo them and check
        again, then decide with ``undo=False``; None: none)."""
        ok = q <= self.rtol
        if prev is not None:
            ok = ok | ((q <= ROUNDING_FLOOR * self.rtol) & (err > STALL_RATIO * prev))
        stalled = None if prev is None else ~ok & ~(err <= SWEEP_STALL * prev)  # NaN: stalled
        blown = self.policy.blown(err) if undo else None
        flags = torch.stack([err.max().to(torch.float64), ok.all(), (~ok & torch.isfinite(err)).any(),
                             torch.zeros((), dtype=torch.bool, device=err.device) if stalled is None else stalled.any(),
                             torch.zeros((), dtype=torch.bool, device=err.device) if blown is None else blown.any(),
                             ]).tolist()  # the iteration's one host synchronisation
        worst, all_ok, any_finite_left, any_stalled, any_blown = flags
        self.info.residuals.append(worst)
        if any_blown:
            return None, blown
        stalled = stalled if any_stalled else None
        if all_ok:
            return Decision(ok, stalled, True, "converged"), None
        if self.info.iterations >= self.opts.max_iters:
            return Decision(ok, stalled, True, "max_iters"), None
        if not any_finite_left:  # further steps cannot help
            return Decision(ok, stalled, True, "non_finite"), None
        return Decision(ok, stalled, False, ""), None

    def correction_check(self, prev):
        """Per sequence ``[B]``: the Newton correction at the iterate, ``δ = scan(J, r)`` (its error,
        carried along T), is within ``atol + rtol·max|h|`` of the sequence. A cell's rounding scale
        (:meth:`pararnn.Cell.step_jacobian_and_scale`) lets residuals that sit on f's rounding floor
        pass, but a cell that amplifies along T can also carry residuals just under that test into
        a larger error. One scan, no evaluation; a sequence that fails takes the step.

        ``prev``: ``(last, least)``, the corrections measured right before the last step and the
        smallest measured so far, ``[B]`` each (None: none yet). A sequence whose correction is at
        its rounding floor passes too (:func:`correction_at_floor`). Returns
        ``(passes [B], (correction, least) [B])``."""
        o = self.opts
        self.ctx.scan(self.J, self.r, None, self.structure, backend=o.backend, out=self.delta)
        big = self.ctx.max(max_abs(self.delta))
        ok = big <= self.atol + self.rtol * self.ctx.max(max_abs(self.H))  # NaN: False
        if prev is None:
            return ok, (big, big)
        last, least = prev
        return ok | correction_at_floor(big, last, least), (big, torch.minimum(big, least))

    def sweep(self, rows):
        """A multiple-shooting sweep of the sequences ``rows [B]`` (bool), then r and J at the new iterate."""
        L = min(self.T, self.window << max(0, self.info.sweeps - 1))  # L, L, 2L, 4L, ...: see AUTO_SHOOTING_WINDOW
        shooting_sweep(self.cell.step, self.S, self.u, L, self.mask,
                       None if bool(rows.all()) else rows.nonzero().flatten())
        self.evaluate(measure=False)

    def step(self):
        """One Newton step: H += damping · (the scan's solution of the linearised system)."""
        o, policy, H = self.opts, self.policy, self.H
        policy.before_scan(self.J)
        H_next = H if self.S_alt is None else self.S_alt[:, 1:]
        if o.damping == 1.0 and policy.keeps_updates():
            # H + δ in the scan's own pass (no δ buffer written and read back)
            self.ctx.scan(self.J, self.r, None, self.structure, backend=o.backend, out=H_next, base=H)
        else:
            self.ctx.scan(self.J, self.r, None, self.structure, backend=o.backend, out=self.delta)
            policy.limit(self.delta, H, self.r)
            if o.damping != 1.0:
                self.delta.mul_(o.damping)
            torch.add(H, self.delta, out=H_next)
        if self.S_alt is None:
            return
        policy.keep_previous(H)
        self.S, self.S_alt = self.S_alt, self.S
        self.H = self.S[:, 1:]

    # ------------------------------------------------------------------ the loop
    def run(self):
        """Newton until :meth:`decide` stops: ``(S, J, info)`` (see :func:`newton_solve`)."""
        info, policy = self.info, self.policy
        prev = None  # per-sequence max residual before the last step
        correction = None  # (last, least) [B] each: the correction check's corrections, while it runs every step
        while True:
            err, q = self.check(self.first_variant if prev is None else True)
            decision, blown = self.decide(err, q, prev)
            if decision is None:  # the last step blew some sequences up: undo it for them, check again
                info.residuals.pop()
                policy.restore(blown, self.H)
                err, q = self.check()
                decision, _ = self.decide(err, q, prev, undo=False)
            prev = err
            policy.record(err, self.H)
            converged = decision.converged
            if decision.reason == "converged" and self.checks_correction and info.iterations > 0 \
                    and info.iterations < self.opts.max_iters:
                passes, correction = self.correction_check(correction)
                converged = converged & passes
                if not bool(passes.all()):  # (a second synchronisation, in the last iteration or two)
                    decision = Decision(converged, decision.stalled, False, "")
            else:
                correction = None
            if decision.stop:
                break
            if self.window is not None and decision.stalled is not None:
                self.sweep(decision.stalled)
                info.sweeps += 1
            self.step()
            info.iterations += 1
        if policy.clip is not None:  # the backward needs the exact Jacobians at the solution
            self.check()
        return self._result(converged)

    def replay(self, k: int):
        """Exactly k steps with no convergence tests (see :func:`newton_solve`)."""
        self.policy.safeguard = False  # a replay undoes nothing: no copies of the iterate
        self.evaluate(measure=False, variant=self.first_variant)  # the variant the solve's first check ran
        for _ in range(k):
            self.step()
            self.evaluate(measure=False)
        self.info.iterations = k
        return self._result(torch.ones(self.u.shape[0], dtype=torch.bool, device=self.h0.device))

    def _result(self, converged):
        S, info = self.S, self.info
        if S is not self.S_out and self.out_ws is Fresh:  # the caller keeps S: the solve's own buffer
            S = self.S_out.copy_(S)
        info.safeguarded = self.policy.safeguarded
        info.converged = converged
        info.fell_back = torch.zeros_like(converged)
        return S, self.J, info


def correction_at_floor(big: torch.Tensor, last: torch.Tensor, least: torch.Tensor) -> torch.Tensor:
    """Per sequence ``[B]``: a Newton correction ``big`` that sits at its rounding floor, where more
    steps cannot shrink it. The last step did not shrink it below ``STALL_RATIO`` of ``last`` (the
    correction before that step), and it is within ``1 / STALL_RATIO`` of ``least``, the smallest
    correction of this solve: the floor that steps reached. A correction that grows beyond that
    is not rounding that no step removes: it does not pass, and the solve steps on (NaN: False)."""
    return (big > STALL_RATIO * last) & (big * STALL_RATIO <= least)


def replay_steps(info: SolverInfo | None) -> int | None:
    """How many Newton steps reproduce the solve that gave ``info`` (with the same inputs and
    options), or None where it cannot be replayed: not a parallel solve, or one that did not converge,
    fell back, undid a step or took a shooting sweep for some sequence (those take the full solve again)."""
    if info is None or info.mode != "parallel" or info.safeguarded or info.sweeps or not info.all_converged:
        return None
    if info.fell_back is not None and bool(info.fell_back.any()):
        return None
    return info.iterations


def handle_failure(cell, u, S, J, info: SolverInfo, opts: SolverOptions, ctx: ParallelContext = LOCAL,
                   warn=warnings.warn, mask: torch.Tensor | None = None) -> None:
    """The failure policy, applied by the caller of :func:`newton_solve` to its result.

    ``"raise"``: ConvergenceError. ``"warn"``: a ConvergenceWarning, the last iterate kept.
    ``"fallback"``: the non-converged sequences (only those) are recomputed sequentially in place
    (S, J updated; ``info.fell_back`` set), with a ConvergenceWarning. Where the context cannot
    fall back (sequence parallelism) ``"fallback"`` raises. Messages are fixed texts: the numbers
    are on ``info`` (residuals, converged, fell_back), so repeated warnings are recognised as one.
    """
    if info.all_converged:
        return
    bad = (~info.converged).nonzero().flatten()
    if opts.on_fail == "raise" or (opts.on_fail == "fallback" and not ctx.supports_fallback):
        raise ConvergenceError(
            f"Newton did not converge for {bad.numel()}/{len(info.converged)} sequences in "
            f"{info.iterations} iterations (max_iters={opts.max_iters}); residual history "
            f"{[f'{x:.2g}' for x in info.residuals]}. Use on_fail='fallback' or mode='sequential', "
            "raise max_iters, or damp the cell.")
    if opts.on_fail == "warn":
        warn(ConvergenceWarning(NOT_CONVERGED_MSG))
        return
    warn(ConvergenceWarning(FELL_BACK_MSG))
    H, h0 = S[:, 1:], S[:, 0]
    mb = None if mask is None else mask[bad]
    H[bad] = sequential_solve(cell.step, u[bad], h0[bad], mb)
    Jb, rb = J[bad], torch.empty_like(H[bad])
    evaluate(cell, S[bad], u[bad], rb, Jb, opts.eval_chunk, mask=mb)
    J[bad] = Jb
    info.fell_back[bad] = True


NOT_CONVERGED_MSG = ("pararnn: Newton did not converge for some sequences; the last iterate is returned "
                     "(see rnn.last_info for residuals and which sequences)")
FELL_BACK_MSG = ("pararnn: Newton did not converge for some sequences; those were recomputed sequentially "
                 "(see rnn.last_info for residuals and which sequences)")
