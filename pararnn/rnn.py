"""`RNN`: run a `Cell` over a sequence, in parallel (Newton + scans) or sequentially.

The module validates its inputs, chooses the mode and calls the engine: :mod:`pararnn.autograd`
(the differentiable parallel solve), :mod:`pararnn.chunking` (``chunk_size``) and
:mod:`pararnn.solver` (Newton, the sequential loop, the options).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import difflib
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import compat
from .autograd import TORCH_FUNC_MSG, OwnTensor, parallel_solve, under_functional_ad
from .cell import Cell
from .chunking import chunk_steps, solve_in_chunks
from .inputs import HALF, all_finite, autocast_dtype, check_x, make_h0, padding_mask, param_like, unpack
from .runtime import release_freed_memory
from .solver.compile import resolve_compile
from .solver.fallback import sequential_solve
from .solver.mode import choose_mode
from .solver.newton import replay_steps
from .solver.options import SolverInfo, SolverOptions, SolveStats
from .structure import run_transition
from .verify import cell_untouched

MODES = ("parallel", "sequential", "auto")


def _renamed(options: dict) -> dict:
    """``options`` if each is a :class:`SolverOptions` field; a TypeError naming the unknown one
    (with the nearest field names, or the field it was renamed to) otherwise."""
    if "chunk" in options:
        raise TypeError("the solver option chunk was renamed eval_chunk (state elements per cell evaluation); "
                        "chunk_size is the number of time steps per solve chunk")
    fields = [f.name for f in dataclasses.fields(SolverOptions)]
    for name in options:
        if name not in fields:
            near = difflib.get_close_matches(name, fields, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
            raise TypeError(f"unknown solver option {name!r}{hint} (the options are pararnn.SolverOptions' fields: "
                            f"{', '.join(fields)})")
    return options


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` is ``b`` or a view of ``b``'s memory (of ``b`` itself or of the tensor ``b`` views)."""
    base = b if b._base is None else b._base
    return a is b or a is base or a._base is base


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
        """Call ``hook(rnn, info)`` after every forward, e.g. to log Newton steps and fallbacks per
        layer and training step.

        Args:
            hook: ``hook(rnn, info)``, info a :class:`pararnn.SolverInfo`.

        Returns:
            A handle whose ``remove()`` unregisters the hook, as torch.nn's hooks do.
        """
        handle = torch.utils.hooks.RemovableHandle(self._solve_hooks)
        self._solve_hooks[handle.id] = hook
        return handle

    def _warn_once(self, w: Warning) -> None:
        """Issue each warning text once per module (the numbers live on ``last_info``)."""
        seen = self.__dict__.setdefault("_warned", set())
        if str(w) not in seen:
            seen.add(str(w))
            warnings.warn(w, stacklevel=4)

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
        """``x [1, total, D]`` with ``cu_seqlens [N+1]``: solved as a right-padded batch, packed back."""
        check_x(self.cell, x)
        xp, lengths, valid = unpack(x, cu_seqlens)  # [N, L_max, D], [N], [N, L_max]
        out = self.forward(xp, h0, mode, return_info, lengths=lengths, **solver_overrides)
        return (out[0][valid].unsqueeze(0), *out[1:])  # y [1, total, out], h_T [N, state]

    def _forward(self, x, h0, mode, return_info, lengths, **solver_overrides):
        check_x(self.cell, x)
        opts = dataclasses.replace(self.options, **_renamed(solver_overrides)) if solver_overrides else self.options
        mode = self.mode if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        functional = under_functional_ad()
        if functional:  # values cannot be inspected there: only the plain loop traces
            if mode == "parallel":
                raise RuntimeError(TORCH_FUNC_MSG)
            mode = "sequential"  # (activation checkpoints do not run under torch.func either)
            opts = dataclasses.replace(opts, check_finite=False, chunk_size=None)
        mask = padding_mask(lengths, x, opts.process_group)  # [B, T] or None
        if mask is not None:  # padding is padding: whatever it holds reaches no product, output or gradient
            x = x.masked_fill(~mask[..., None], 0)
        # with chunk_size every chunk prepares its own inputs: here one step, for dtypes and shapes,
        # leaving the caller's random stream and the cell's buffers alone (dropout, batch norm)
        chunked = opts.chunk_size is not None
        xp = x[:, :1] if chunked else x
        with cell_untouched(self.cell, x.device) if chunked else contextlib.nullcontext():
            u = self._prepare(xp)  # [B, T, *]
        low = autocast_dtype(u.device)
        real = u.real.dtype if u.is_complex() else u.dtype
        # step's matmuls run in `low`: converge to its precision (autocast leaves float64 alone)
        if low is not None and opts.rtol is None and real != torch.float64:
            tol = max(opts.tolerances(low)[0], opts.tolerances(real)[0])
            opts = dataclasses.replace(opts, rtol=tol)
        if u.shape[:2] != xp.shape[:2]:
            raise ValueError(f"{type(self.cell).__name__}.prepare must keep [B, T] leading dims: "
                             f"x {list(xp.shape)} -> u {list(u.shape)}")
        user_h0 = h0 is not None
        h0 = make_h0(self.cell, h0, u)
        B, T = x.shape[:2]
        if opts.process_group is not None:  # every rank holds a chunk: only the parallel solve links them
            if mode == "sequential":
                raise ValueError("mode='sequential' cannot be combined with process_group (each rank would "
                                 "solve its chunk from h0); use mode='parallel', or drop process_group")
            mode = "parallel"
        steps = min(T, opts.chunk_size) if isinstance(opts.chunk_size, int) else T  # one solve's steps
        opts = resolve_compile(opts, self.cell, h0, B, steps)  # compile_cell="auto" decided here
        if mode == "auto":
            training = torch.is_grad_enabled() and (  # (x: the chunked path's u was made without a graph)
                x.requires_grad or u.requires_grad or h0.requires_grad
                or any(p.requires_grad for p in self.cell.parameters()))
            mode = choose_mode(B, T, self.cell.state_size, u.device, self.cell.get_structure(), training,
                               h0.dtype, opts.backend, compile_cell=opts.compile_cell)
        y, hT, info = self._solve(x, None if chunked else u, h0, user_h0, mode, opts, mask)
        return (y, hT, info) if return_info else (y, hT)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``cell.prepare(x)``; under autocast, half-precision inputs are brought back to the
        parameters' precision (the state, Jacobians and scans stay there)."""
        u = self.cell.prepare(x)
        if autocast_dtype(u.device) is not None:
            p = param_like(self.cell)
            if p is not None and u.dtype in HALF and p.dtype not in HALF:
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
        C = chunk_steps(self.cell, x, h0, opts)
        if C is None:
            y, hT, info = self._solve_chunk(mode, opts, u, x, h0, mask, {}, 0)
        else:
            y, hT, info = solve_in_chunks(self, mode, opts, x, h0, mask, C)
        self.last_info = info
        self.stats.record(info)
        for hook in list(self._solve_hooks.values()):
            hook(self, info)
        return y, hT, info

    def _solve_chunk(self, mode, opts, u, x, h0, mask, infos: dict, i: int, transitions: dict | None = None,
                     chunked: bool = False, warm: dict | None = None):
        """One solve over ``x [B, n, D_in]`` (``u = prepare(x)``, computed here if None) from ``h0``,
        and its readout: ``(y, h_last, info)``. ``infos[i]`` keeps the first info of chunk i (a
        backward recompute does not replace it); ``transitions[i]``, if asked for, the chunk's
        transition ``dh_last/dh0 [B, *jac]`` (computed once, not again in a recompute). ``warm["init"]``,
        once set, is this chunk's solution from the forward (a view of the output buffer, with
        ``warm["version"]`` its version after the forward): the backward's recompute evaluates the
        Jacobians there instead of solving again, unless the buffer was written since. Otherwise a recompute (``infos[i]`` set) replays the
        forward's Newton steps without their convergence tests (:func:`pararnn.solver.newton.replay_steps`):
        the same iterates, without the residual measures."""
        replay = replay_steps(infos.get(i))
        # the forward's solution is read from the output buffer the user holds: only while its
        # version counter shows no write since the forward (y += skip, relu_(y), ... change it)
        if warm and mode != "sequential" and compat.version_counter(warm["init"]) == warm.get("version"):
            opts = dataclasses.replace(opts, init=warm["init"])
            replay = []  # the forward's solution itself (the forward's last evaluation was there too)
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
        if mask is not None:  # zero at padded positions (a tensor of its own)
            y = y * mask[..., None].to(y.dtype)
        elif y is H:  # the states themselves: y gets an autograd node of its own (no copy), so that h_last's
            # gradient does not pass through y's (hooks, retain_grad, autograd.grad of y); a view under
            # torch.func and forward-mode AD, which a custom Function without a jvp rule cannot enter
            y = H.view_as(H) if under_functional_ad() else OwnTensor.apply(H)
        elif not chunked and _aliases(y, H):  # a part of the states (LSTM's h): a copy, as torch.nn.LSTM's
            y = y.clone()  # output is no view (y.detach_()); a chunk is copied into the output buffer anyway
        return y, H[:, -1].clone(), info  # a copy: a view would keep the chunk's states alive

    @torch.no_grad()
    def solve_info(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> SolverInfo:
        """Run the parallel solver on x and report how it went.

        Args:
            x: ``[B, T, D_in]`` inputs.
            h0: ``[B, d]`` initial state (None: the cell's).

        Returns:
            The solve's :class:`pararnn.SolverInfo` (iterations, sweeps, residuals, fallbacks).
        """
        return self.forward(x, h0, mode="parallel", return_info=True)[2]

    def step(self, x_t: torch.Tensor, h: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """Decode one token: one step of the cell.

        Args:
            x_t: ``[B, D_in]`` this step's inputs.
            h: ``[B, state]`` state (None: the cell's initial state).
            mask: ``[B]`` bool, optional: False for sequences past their end, whose state is
                held and whose ``y_t`` is zero, as at the padded steps of ``forward(..., lengths=)``.

        Returns:
            ``(y_t [B, out], h_next [B, state])``.
        """
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2:
            raise ValueError(f"x_t must be [B, D_in], got {getattr(x_t, 'shape', type(x_t))}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool
                                 or tuple(mask.shape) != (x_t.shape[0],)):
            raise ValueError(f"mask must be a bool tensor [B] = [{x_t.shape[0]}], got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {list(getattr(mask, 'shape', []))}")
        x = x_t.unsqueeze(1)
        check_x(self.cell, x)
        u = self.cell.prepare(x)
        h = make_h0(self.cell, h, u)
        h_next = self.cell.step(h, u[:, 0])
        y = self.cell.output(h_next.unsqueeze(1), x)[:, 0]
        if mask is not None:
            keep = mask.to(x_t.device)[:, None]
            h_next = torch.where(keep, h_next, h)
            y = y * keep.to(y.dtype)
        elif _aliases(y, h_next):  # the state itself or a part of it (LSTM's h): an in-place op on y
            y = y.clone()  # (y += skip, relu_) must not change the state the next step reads
        return y, h_next

