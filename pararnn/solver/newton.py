"""Newton's method on F(H)_t = h_t - f(h_{t-1}, u_t) = 0: every iteration is one linear scan.

:class:`NewtonSolver` holds one solve's buffers and one method per part of an iteration;
:meth:`NewtonSolver.decide` holds every stopping rule.
"""
from __future__ import annotations

import dataclasses

import torch

from ..cell import gives_scale
from ..parallel import LOCAL, ParallelContext
from ..workspace import Fresh
from .compile import can_compile, resolve_compile
from .evaluate import evaluate, initial_guess, max_abs
from .options import SolverInfo, SolverOptions
from .safeguard import StepPolicy
from .shooting import SWEEP_STALL, shooting_sweep, shooting_window

# A sequence within ROUNDING_FLOOR·rtol·scale that the last step could not shrink by STALL_RATIO
# sits at the rounding floor of evaluating f (terms of f that cancel): more steps only hover there
# (tests/solver/test_engine.py; history: results/calibration_history.md).
ROUNDING_FLOOR = 16.0
STALL_RATIO = 0.5


def newton_solve(cell, u: torch.Tensor, h0: torch.Tensor, opts: SolverOptions, ctx: ParallelContext = LOCAL,
                 mask: torch.Tensor | None = None, replay: list | None = None, ws=None, outputs_from_ws: bool = False):
    """Solve ``h_t = f(h_{t-1}, u_t)``, t = 1..T, by Newton with parallel linear scans.

    u: ``[B, T, *]`` (prepared inputs), h0: ``[B, d]``, mask: ``[B, T]`` bool or None (False =
    a padded step: f = h_prev, J = I). Runs without autograd. ``ctx`` says where the scans run
    (local, or this rank's time chunk).

    Returns ``(S, J, info)``: ``S [B, T+1, d]`` holds ``(h0, h_1..h_T)`` (so ``S[:, 1:]`` is the
    solution and ``S[:, :-1]`` the previous states), ``J [B, T, *jac]`` is df/dh at the solution
    and ``info`` a :class:`SolverInfo` (``info.converged`` says which sequences converged: the
    caller applies the failure policy, :func:`handle_failure`). J is what the adjoint backward
    needs, so the final convergence check doubles as the backward's linearisation.

    ``replay=`` :func:`replay_steps` of a solve known to have converged from the same inputs and
    ``opts`` (a chunked backward's recompute) repeats its k steps: exactly k steps, no
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
    (or None: no step to compare with yet), whether to stop and why, and which sequences the next
    step must not move (converged while others go on)."""

    converged: torch.Tensor
    stalled: torch.Tensor | None
    stop: bool
    reason: str  # "converged", "max_iters", "non_finite" or "" (go on)
    frozen: torch.Tensor | None = None  # [B]: converged sequences the next step leaves as they are (None: none)


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
        opts = resolve_compile(opts, cell, h0, *u.shape[:2])
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
        # From f(h0, u_t), the first iterate is exact only where f ignores its state (or T = 1): its
        # eager check measures max|r| (for the safeguard and the stall test) but not q, whose pass
        # over the rounding scale costs a third of an eager evaluation. Compiled, that pass is fused
        # into the evaluation's loop, and the full variant serves (one graph fewer to compile).
        guessed = initial_guess(cell, u, h0, opts, self.H)
        compiled = opts.compile_cell and can_compile(h0)
        self.first_variant = "err" if guessed and T > 1 and not compiled else True
        self.info = SolverInfo(mode="parallel", rtol=self.rtol, atol=self.atol)
        self.plans = {}  # the evaluation pieces' views, per iterate buffer (see evaluate)
        self.policy = StepPolicy(opts, structure, self.atol, self.ws)
        self.window = self.info.shooting_window = shooting_window(opts.shooting, T)
        self.gives_scale = gives_scale(cell)

    def checks_correction(self) -> bool:
        """Whether converged sequences take :meth:`correction_check`: where the test reads a rounding
        scale s, the cell's own or one the compiled evaluation derived from a traced step
        (:func:`pararnn.solver.compile.with_rounding_scale`)."""
        jac = self.plans.get("jac")
        return self.gives_scale or (jac is not None and jac[0].gives_scale)

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
          or sits at the rounding floor: q within ``ROUNDING_FLOOR·rtol`` and the last step could
          not shrink q by ``STALL_RATIO`` (q, not max|r|: one large entry of a state sets max|r|);
        - it has stalled (a shooting sweep goes first) when it has not converged, is not within
          ``ROUNDING_FLOOR·rtol`` (there max|r| moves with rounding, and Newton steps end by the
          floor rule) and the last step did not shrink its residual by ``SWEEP_STALL``;
        - the solve stops when every sequence converged (then :meth:`correction_check` may still
          send some on), at ``max_iters``, or when every unconverged sequence is NaN/Inf;
        - a converged sequence is frozen while others go on: its update is zero (a step from an
          iterate exact to rounding can amplify that rounding through a latch's Jacobians).

        ``prev``: ``(max|r|, q)`` before the last step, ``[B]`` each (None: none yet). Also returns the
        sequences whose last step blew them up (``[B]`` bool, with no decision: undo them and check
        again, then decide with ``undo=False``; None: none)."""
        ok = q <= self.rtol
        near_floor = q <= ROUNDING_FLOOR * self.rtol
        if prev is not None:
            ok = ok | (near_floor & (q > STALL_RATIO * prev[1]))
        # near the floor max|r| moves with rounding: such a sequence takes Newton steps (the floor
        # rule above ends them as soon as one cannot halve q), not a sweep
        stalled = None if prev is None else ~ok & ~near_floor & ~(err <= SWEEP_STALL * prev[0])  # NaN: stalled
        blown = self.policy.blown(err) if undo else None
        flags = torch.stack([err.max().to(torch.float64), ok.all(), ok.any(), (~ok & torch.isfinite(err)).any(),
                             torch.zeros((), dtype=torch.bool, device=err.device) if stalled is None else stalled.any(),
                             torch.zeros((), dtype=torch.bool, device=err.device) if blown is None else blown.any(),
                             ]).tolist()  # the iteration's one host synchronisation
        worst, all_ok, any_ok, any_finite_left, any_stalled, any_blown = flags
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
        return Decision(ok, stalled, False, "", ok if any_ok else None), None

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
        """A multiple-shooting sweep of the sequences ``rows [B]`` (bool); the loop checks the new
        iterate before it steps (a swept sequence may have converged, and a Newton step from an
        iterate exact to one evaluation's rounding can amplify that rounding through a latch's
        Jacobians)."""
        L = min(self.T, self.window << max(0, self.info.sweeps - 1))  # L, L, 2L, 4L, ...: see AUTO_SHOOTING_WINDOW
        shooting_sweep(self.cell.step, self.S, self.u, L, self.mask,
                       None if bool(rows.all()) else rows.nonzero().flatten())
        self.info.sweeps += 1
        if self.opts.compile_cell:
            # The sweep ran the cell eagerly: its windows are exact for the eager step, and the
            # compiled one rounds differently (a few ulp, which a latch's Jacobians amplify from step
            # to step). The rest of the solve evaluates eagerly too, so the checks judge the iterate
            # by the function that made it.
            self.opts = dataclasses.replace(self.opts, compile_cell=False)
            self.plans.clear()
        self.info.residuals.pop()  # the check after the sweep measures the iterate the next step starts from

    def step(self, frozen=None):
        """One Newton step: H += damping · (the scan's solution of the linearised system); the
        sequences ``frozen [B]`` (bool, or None) keep their iterate (their residual is zeroed first)."""
        o, policy, H = self.opts, self.policy, self.H
        if frozen is not None:
            self.r.masked_fill_(frozen[:, None, None], 0)
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
        prev = None  # per sequence (max residual, q) before the last step
        correction = None  # (last, least) [B] each: the correction check's corrections, while it runs every step
        swept = False  # the last thing done was a sweep, not a step (no second sweep before a step)
        while True:
            err, q = self.check(self.first_variant if prev is None else True)
            since = None if swept else prev  # after a sweep no step to judge: no floor, no stall
            decision, blown = self.decide(err, q, since)
            if decision is None:  # the last step blew some sequences up: undo it for them, check again
                info.residuals.pop()
                policy.restore(blown, self.H)
                err, q = self.check()
                decision, _ = self.decide(err, q, since, undo=False)
            prev = (err, q)
            policy.record(err, self.H)
            converged = decision.converged
            if decision.reason == "converged" and self.checks_correction() and info.iterations > 0 \
                    and info.iterations < self.opts.max_iters:
                passes, correction = self.correction_check(correction)
                converged = converged & passes
                if not bool(passes.all()):  # (a second synchronisation, in the last iteration or two)
                    decision = Decision(converged, decision.stalled, False, "", converged)
            else:
                correction = None
            if decision.stop:
                break
            if self.window is not None and decision.stalled is not None and not swept:
                self.sweep(decision.stalled)
                swept = True
                continue
            swept = False
            self.step(decision.frozen)
            info.frozen.append(decision.frozen)
            info.iterations += 1
        if policy.clip is not None:  # the backward needs the exact Jacobians at the solution
            self.check()
        return self._result(converged)

    def replay(self, frozen_steps: list):
        """The steps of a solve again, each freezing what it froze, with no convergence tests (see
        :func:`newton_solve`)."""
        self.policy.safeguard = False  # a replay undoes nothing: no copies of the iterate
        self.evaluate(measure=False, variant=self.first_variant)  # the variant the solve's first check ran
        for frozen in frozen_steps:
            self.step(frozen)
            self.evaluate(measure=False)
        self.info.iterations = len(frozen_steps)
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


def replay_steps(info: SolverInfo | None) -> list | None:
    """The Newton steps that reproduce the solve that gave ``info`` (with the same inputs and
    options): per step, the sequences it froze (``[B]`` bool or None; ``info.frozen``), so its
    length is the step count. None where it cannot be replayed: not a parallel solve, or one that
    did not converge, fell back, undid a step or took a shooting sweep for some sequence (those take
    the full solve again)."""
    if info is None or info.mode != "parallel" or info.safeguarded or info.sweeps or not info.all_converged:
        return None
    if info.fell_back is not None and bool(info.fell_back.any()):
        return None
    return list(info.frozen) if info.frozen else [None] * info.iterations


