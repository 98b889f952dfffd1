"""``chunk_size``: T solved in consecutive chunks, each an activation checkpoint whose backward
recomputes it; across ranks, Newton on the states entering each rank's part.

The functions take the :class:`pararnn.RNN` whose ``_solve_chunk`` solves one chunk and reads it out.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils.checkpoint import checkpoint

from . import compat
from .cell import Cell
from .parallel import context_for
from .solver.options import ConvergenceError, SolverInfo, auto_chunk_size
from .structure import compose
from .utils.functional import call_with, named_tensors
from .utils.rng import RandomState
from .verify import cell_untouched, check_prepare_is_per_step, verified, verify_once


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


class _ForwardState:
    """``fn(*args)`` (a chunk's solve, activation-checkpointed) run with the parameters and buffers
    the cell had when the forward ran, so the backward's recompute evaluates the same function:
    under ``torch.func.functional_call`` the module's own tensors are back in place by the time the
    backward runs. A tensor changed in place since the forward (its version counter moved) raises,
    as autograd does for the tensors it saves. Parameters bound from an owner (``pararnn.nn``) are
    the owner's."""

    def __init__(self, cell, fn):
        self.root, self.fn = cell.__dict__.get("_owner", cell), fn
        self.state = named_tensors(self.root)
        self.versions = {k: compat.version_counter(t) for k, t in self.state.items()}

    def __call__(self, *args):
        for k, t in self.state.items():
            if compat.version_counter(t) != self.versions[k]:
                raise RuntimeError(
                    f"pararnn: {k} was modified in place between the forward and the "
                    "backward of a chunked solve (chunk_size), whose backward recomputes each chunk with "
                    "it; call backward before changing it (e.g. before optimizer.step()).")
        return call_with(self.root, self.state, self.fn, *args)


class _LinkRanks(torch.autograd.Function):
    """Identity on this rank's ``(y, h_last)`` (returned as copies) whose backward adds the cotangent
    ``μ`` of h_last from the later ranks (see :func:`solve_across_ranks`). ``s_in`` is this rank's entering
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


def chunk_steps(cell, x, h0, opts) -> int | None:
    """Steps per solve chunk of ``x [B, T, D_in]`` (``opts.chunk_size``, ``"auto"`` resolved), or None
    for one solve over all of T."""
    C, T = opts.chunk_size, x.shape[1]
    if C is None:
        return None
    if C == "auto":
        d = cell.state_size
        jac = math.prod(cell.get_structure().storage_shape(d))
        C = auto_chunk_size(x.shape[0], T, d, jac, h0.element_size(), opts.memory_budget)
    if context_for(opts.process_group).size() > 1:  # every rank takes the same path (its collectives
        return T if C is None else min(C, T)  # differ), even where its whole part is one chunk
    return None if C is None or C >= T else C


def solve_in_chunks(rnn, mode, opts, x, h0, mask, C: int):
    """T in chunks of C steps, each prepared and solved from the previous chunk's final state.
    With gradients each chunk is a non-reentrant activation checkpoint: the forward keeps its
    inputs (a view of x and the boundary state) and its outputs only; the backward reruns the
    chunk (prepare, Newton and the graph-carrying evaluation at the solution), whose adjoint
    scan then takes the cotangent carried in from the next chunk through h_last.

    With ``process_group`` each rank chunks its own part of T; see :func:`solve_across_ranks`."""
    check_prepare_is_per_step(rnn.cell, x)
    if context_for(opts.process_group).size() > 1:
        return solve_across_ranks(rnn, mode, opts, x, h0, mask, C)
    y, h, infos, _ = chunk_pass(rnn, mode, opts, x, h0, mask, C)
    return y, h, SolverInfo.merge([infos[i] for i in range(len(infos))])

def chunk_pass(rnn, mode, opts, x, h0, mask, C: int, transitions: dict | None = None):
    """One pass over this process's T in chunks of C from ``h0``: ``(y, h_last, infos, P)``,
    ``P`` the whole pass's transition ``dh_last/dh0 [B, *jac]`` when ``transitions`` is given."""
    infos: dict[int, SolverInfo] = {}
    y, h, P = None, h0, None
    # one split node: autograd sums every gradient x receives (a skip connection, another
    # consumer) and hands the split's backward all chunks' gradients at once, which it joins
    T = x.shape[1]
    x_chunks = x.split(C, dim=1)
    mask_chunks = (None,) * len(x_chunks) if mask is None else mask.split(C, dim=1)
    structure = rnn.cell.get_structure()
    # where the output is the state itself (and no step is padded), the output buffer holds each
    # chunk's solution: its recompute warm-starts from it
    warm_start = mask is None and type(rnn.cell).output is Cell.output and torch.is_grad_enabled()
    if mode != "sequential" and opts.check_cell and not verified(rnn.cell, h0):  # the one-off cell check,
        # outside the checkpoints (inside one it would save tensors its recompute does not), its
        # prepare leaving the caller's random stream and the cell's buffers alone (dropout, batch norm)
        with cell_untouched(rnn.cell, x.device):
            verify_once(rnn.cell, rnn._prepare(x[:, :min(T, 64)]), h0)
    warms = []
    # the recompute sees the forward's parameters (only checkpointed chunks recompute)
    solve = _ForwardState(rnn.cell, rnn._solve_chunk) if torch.is_grad_enabled() else None
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
            y_c, h, _ = rnn._solve_chunk(*args)
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
            warm["version"] = compat.version_counter(warm["init"])
    return y, h, infos, P

def solve_across_ranks(rnn, mode, opts, x, h0, mask, C: int):
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
    structure = rnn.cell.get_structure()
    rtol, atol = opts.tolerances(h0.dtype)
    rank0 = pctx.owns_h0()
    s = h0.detach() if rank0 else torch.zeros_like(h0)
    start = RandomState(x.device)  # every pass draws what the first did (a dropout in prepare):
    for passes in range(1, pctx.size() + 2):  # the passes solve one function of the entering states
        start.restore()
        s_in = h0 if rank0 else s.detach().requires_grad_(torch.is_grad_enabled())
        transitions: dict[int, torch.Tensor] = {}
        y, h, infos, P = chunk_pass(rnn, mode, local, x, s_in, mask, C, transitions)
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

