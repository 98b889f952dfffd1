"""The solver's options, its report, its errors and the default tolerances."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..parallel import ParallelContext
from ..kernels.dispatch import check_backend


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
            cell check, :func:`pararnn.verify.is_affine`, else ``"step"``), ``"step"``
            (``h_t = f(h0, u_t)`` for all t, as ParaRNN with h0=0), ``"zeros"``, or a tensor
            ``[B, T, d]`` (warm start, e.g. a previous solution). From zeros an affine cell is
            solved in one Newton step; from ``"step"`` the update cancels at small entries and a
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
            ``memory_budget`` (see :func:`pararnn.solver.options.auto_chunk_size`); no chunking if all of
            T fits. A chunk also bounds Newton's work on hard cells: Newton is exact after at
            most ``chunk_size`` steps. With ``process_group`` each rank chunks its own part, and
            the ranks settle the states entering their parts by Newton (``info.boundary_passes``).
        memory_budget: bytes for one chunk's solver buffers under ``chunk_size="auto"`` (1 GiB).
        eval_chunk: the cell is evaluated over T in pieces of about this many state elements, so
            temporaries stay small (a CPU speed knob; results do not depend on it). Compiled
            evaluations (``compile_cell``) use pieces up to 4× larger (``COMPILED_CHUNK_FACTOR``),
            one sequence each where a sequence holds ``eval_chunk / 2`` elements or more
            (:func:`pararnn.solver.evaluate.pieces_for`).
        compile_cell: ``"auto"`` (default), ``True`` or ``False``. Compiled, each Newton step's cell
            evaluation goes through ``torch.compile`` (inductor, dynamic batch and time sizes):
            the cell's ``f`` and Jacobian, the residual and the convergence reductions fused into
            one loop per evaluation piece that stores r and J straight into the solver's buffers
            (:func:`pararnn.solver.compile.compiled_piece`); so are the initial guess and the
            graph-carrying evaluation at the solution (its forward and its vjp). Its ``torch.tanh``
            is :func:`pararnn.fastmath.tanh` (within 2 ulp; the eager path keeps torch's). A cell
            without a hand-written ``step_and_jacobian`` is traced once with its Jacobian by
            reverse-mode autodiff (:func:`pararnn.solver.compile.traced_jacobian`). Compiled once per
            cell class, parameter shapes, structure, dtype and device (seconds on CPU; inductor's
            cache serves later processes), not per B or T; real dtypes only. ``"auto"`` compiles
            CPU solves of at least 65536 state elements (``B·T·d``) outside autocast
            (:func:`pararnn.solver.compile.use_compiled`); ``False`` is the eager twin. A cell that
            fails to compile runs eagerly, with one warning. A solve that needed a
            multiple-shooting sweep (which runs the cell eagerly) evaluates eagerly from then on.
        check_cell: on the first parallel call per cell, dtype and device, probe ``step`` at a
            few positions (:func:`pararnn.verify.verify_cell`: determinism, no coupling of batch
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
    compile_cell: bool | str = "auto"

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
        if self.compile_cell != "auto" and not isinstance(self.compile_cell, bool):
            raise TypeError(f"compile_cell must be a bool or 'auto', got {self.compile_cell!r}")
        for name in ("safeguard", "check_finite", "check_cell"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """The Newton test's tolerances for a solve in this dtype.

        Args:
            dtype: the state's dtype.

        Returns:
            ``(rtol, atol)``: the options' values where set, else the dtype's defaults (rtol 2e-6
            in fp32, 1e-12 in fp64, 2e-3 in fp16, 1e-2 in bf16; atol the dtype's smallest normal
            number).
        """
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
        frozen: per Newton step, the sequences it left as they were (``[B]`` bool: converged while
            others went on), or None for a step that moved every sequence.
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
    frozen: list = field(default_factory=list, repr=False)

    @property
    def all_converged(self) -> bool:
        """Whether every sequence converged (True for a sequential solve)."""
        return self.converged is None or bool(self.converged.all())

    @staticmethod
    def merge(infos: list["SolverInfo"]) -> "SolverInfo":
        """One info for a solve in time chunks (``chunk_size``): the worst chunk's iterations and
        residuals, a sequence converged if it did in every chunk and fell back if it did in any;
        ``chunks`` keeps each chunk's own info.

        Args:
            infos: the chunks' infos, in time order.

        Returns:
            A :class:`SolverInfo` for the whole solve.
        """
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


@dataclasses.dataclass
class SolveStats:
    """Running totals of an :class:`RNN`'s solves since construction or :meth:`reset`, so drift in
    Newton steps or fallbacks during training is visible (``rnn.stats``).

    Attributes:
        calls: forwards recorded; ``parallel_calls`` of them parallel solves.
        newton_steps: Newton steps in all; ``max_newton_steps`` the most in one solve.
        sequences: sequences solved in parallel; ``fell_back`` and ``not_converged`` of them
            finished by the sequential loop or not converged.
        safeguarded: solves in which the safeguard undid or damped a step.
        sweeps: multiple-shooting sweeps in all.
    """

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
        """Add one solve to the totals.

        Args:
            info: the solve's :class:`SolverInfo`.
        """
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
        """Newton steps per parallel solve."""
        return self.newton_steps / max(self.parallel_calls, 1)

    def reset(self) -> None:
        """Set every total back to zero."""
        self.__init__()

    def summary(self) -> dict:
        """The totals as a dict.

        Returns:
            Every field and ``mean_newton_steps``, by name (JSON-ready numbers).
        """
        return {**dataclasses.asdict(self), "mean_newton_steps": self.mean_newton_steps}


