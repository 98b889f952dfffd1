"""The cell's evaluation over the whole sequence, in pieces: residuals, Jacobians and the
convergence measures written into the solver's buffers; the initial guess."""
from __future__ import annotations

import math

import torch

from ..cell import uses_jvp
from .compile import can_compile, compiled_piece, static_features, traced_jacobian
from .options import SolverOptions


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
    ``[B, T, d]`` and ``J [B, T, *jac]`` (contiguous: pieces write through views of them, see
    :func:`contiguous_pieces`; ``mask [B, T]``: padded steps hold the state, :func:`hold_padded`).
    Returns per sequence ``[B]``: ``max|r|`` and ``q = max((|r_t| - atol)₊ / scale_t)``: the
    sequence passes ``|r| <= atol + rtol·scale`` exactly when ``q <= rtol``. The per-entry scale
    ``max(|f_t|, s_t) + |J_t| |h_{t-1}|`` (s from :meth:`pararnn.Cell.step_jacobian_and_scale`,
    None: |f| alone) is the size of what rounds when f is evaluated, cancelling terms included.
    Per entry and position, so neither a large entry of the same state nor a blown-up iterate
    elsewhere can make a residual pass that is garbage at the small entries; NaN gives q = NaN.

    ``compiled=True`` runs each chunk through :func:`evaluate_piece` compiled by torch.compile
    (one fused pass, see :func:`compiled_piece`); otherwise eagerly (the reference twin).
    ``measure``: True returns both, ``"err"`` only ``max|r|`` (q is None: the scale's pass is
    skipped), False neither (r and J only). ``variant``: which compiled variant (a ``measure``
    value) computes r and J; by default ``measure``, or True where ``measure`` is False. Variants
    are separate fused loops that could round r and J differently, so a replay
    (:func:`newton_solve`) passes the variant of each evaluation of the solve it repeats.
    ``plans``: a dict that one solve passes to each of its evaluations (the same u, r, J and mask,
    S one of its iterate buffers): the pieces' argument views are built once per S.
    """
    B = u.shape[0]
    structure = cell.get_structure() if structure is None else structure
    compiled, jac = _compiled_jacobian(cell, S, u, plans, compiled)
    piece = compiled_piece(evaluate_piece, cell) if compiled else evaluate_piece
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
        e, qc = piece(cell, structure, *args[:4], atol, *args[4:], variant, jac)
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


def _compiled_jacobian(cell, S: torch.Tensor, u: torch.Tensor, plans: dict | None, compiled: bool):
    """``(compiled, jac)``: whether the evaluation runs compiled (real dtypes only), and the traced
    Jacobian graph it calls for a cell whose Jacobian comes from autodiff (None: the cell's own).
    Such a cell that cannot be traced is evaluated eagerly."""
    if not (compiled and can_compile(S)):
        return False, None
    if not uses_jvp(cell):
        return True, None
    jac = _traced(cell, S, u, plans)
    return jac is not None, jac


def _traced(cell, S: torch.Tensor, u: torch.Tensor, plans: dict | None):
    """:func:`~pararnn.solver.compile.traced_jacobian` at these buffers, its tensors marked static
    (once per solve: kept in ``plans``)."""
    if plans is not None and "jac" in plans:
        return plans["jac"]
    jac = traced_jacobian(cell, S[0], u[0])
    if jac is not None:
        static_features(0, *jac[1])
    if plans is not None:
        plans["jac"] = jac
    return jac


def piece_plan(S, u, r, J, mask, structure, chunk: int, eager: bool) -> list[tuple]:
    """The arguments of :func:`evaluate`'s pieces, in (b, t) order: ``(hp, u, hn, m, r_out, J_out)``
    views per piece (detached, feature sizes marked static for a compiled piece)."""
    B, T = u.shape[:2]
    d = S.shape[-1]
    # A piece holds about `chunk` state elements and at most 2·chunk Jacobian entries (a dense d×d
    # Jacobian is d× its state: sized by the state alone, its temporaries would not fit in cache)
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
                   atol: float, r_out: torch.Tensor, J_out: torch.Tensor, measure: bool | str = True, jac=None):
    """One piece of :func:`evaluate`: ``hp, hn [B, n, d]`` (previous and current states),
    ``u [B, n, *]``, ``m [B, n]`` or None. Writes ``r`` into ``r_out [B·n, d]`` and ``J`` into
    ``J_out [B·n, *jac]`` (views of the solver's buffers, rows in (b, t) order) and returns
    ``(max|r| [B], q [B])``; ``(max|r|, None)`` with ``measure="err"``, ``(None, None)`` with
    ``measure=False``. ``jac``: ``(graph, tensors)`` of :func:`~pararnn.solver.compile.traced_jacobian`
    computes f, J and f's rounding scale in place of the cell's ``step_jacobian_and_scale`` (None:
    the cell's)."""
    B, n, d = hp.shape
    N = B * n
    hp = hp.reshape(N, d)  # [N, d]
    u = u.reshape(N, *u.shape[2:])
    s = None
    if jac is not None:  # traced on contiguous rows, whose reshapes it recorded as views: it gets such rows
        f, Jc, *scale = jac[0](jac[1], hp.contiguous(), u.contiguous())  # (a copy only for one step of several rows)
        s = scale[0] if scale and measure is True else None
    elif measure is True:  # the test reads the cell's rounding scale s [N, d] too (or None)
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


# Compiled pieces are this many times eval_chunk: a fused piece has no temporaries of its size,
# so larger pieces only save calls (set by benchmarks/bench_constants.py).
COMPILED_CHUNK_FACTOR = 4


# A sequence of at least eval_chunk / ONE_ROW_DIVISOR state elements is a compiled piece of its
# own: one fused loop, where several rows compile into passes with temporaries
# (set by benchmarks/bench_constants.py).
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


def max_abs(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` per sequence: ``t [B, ...] -> [B]`` (NaN propagates). For a real t, the larger of
    ``max t`` and ``-min t``: no temporary of t's size, whose fresh pages cost more than the
    two reductions."""
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
    carries the gradients, see :func:`pararnn.autograd.parallel_solve`): ``hp [N, d]`` previous states,
    ``u [N, *]``, ``m [N]`` or None (padded steps hold the state). Returns ``[N, d]``. Compiled
    (:func:`compiled_piece`), its forward and its vjp are one fused loop each."""
    return hold_padded(cell.step(hp, u), None, hp, m, None)[0]


def step_piece(cell, h0: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
    """``out = f(h0, u_t)`` for every step of a piece: h0 ``[B, d]``, u ``[B, n, *]``, out
    ``[B, n, d]`` or ``[B·n, d]`` (rows in (b, t) order)."""
    B, n = u.shape[:2]
    h = h0.unsqueeze(1).expand(B, n, h0.shape[-1]).reshape(B * n, h0.shape[-1])
    out.copy_(cell.step(h, u.reshape(B * n, *u.shape[2:])).reshape(out.shape))


