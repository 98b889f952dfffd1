"""The probes: what the solver checks about a cell before it trusts it.

:func:`check_structure` (a user's own check of a declared Jacobian), :func:`verify_cell` (the
probe the parallel solver runs once per cell, dtype and device), :func:`is_affine`, and the facts
the probes found about a cell (:class:`CellFacts`), kept until its parameters change.
"""
from __future__ import annotations

import contextlib

import torch

from . import compat
from .cell import Cell, autodiff_step_and_jacobian, gives_scale
from .structure import Dense
from .utils.functional import jvp, own_saved_tensors
from .utils.rng import RandomState, untouched_rng


def dense_jacobian(cell: Cell, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The full Jacobian ``df/dh``, whatever structure the cell declares (by torch.func).

    Args:
        cell: a :class:`pararnn.Cell`.
        h: ``[N, d]`` states.
        u: ``[N, *]`` prepared inputs.

    Returns:
        ``[N, d, d]`` (row i = d f_i / d h).
    """
    return autodiff_step_and_jacobian(cell.step, h, u, Dense())[1]


def check_structure(
    cell: Cell,
    u: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    n_points: int = 8,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    """Check that ``cell`` is what its ``structure`` declaration says, at random points.

    Compares the dense Jacobian (jacfwd) with the declared-structure Jacobian from
    ``cell.step_and_jacobian``: entries outside the declared pattern must be zero, and the
    entries inside must agree. Raises ``ValueError`` naming the worst offending entry.

    Args:
        u: prepared inputs ``[N, *]`` to test at (default: the cell's ``prepare`` of random
            ``[N, 1, input_size]`` inputs, which needs ``cell.input_size``).
        h: states ``[N, d]`` (default: standard normal).
    """
    structure = cell.get_structure()
    gen = torch.Generator().manual_seed(seed)
    p = next(iter(cell.parameters()), None)
    dtype = p.dtype if p is not None else torch.get_default_dtype()
    device = p.device if p is not None else torch.device("cpu")
    if u is None:
        if cell.input_size is None:
            raise ValueError("check_structure: pass u, or give the cell an input_size")
        x = torch.randn(n_points, 1, cell.input_size, generator=gen, dtype=dtype).to(device)
        u = cell.prepare(x)[:, 0]
    N = u.shape[0]
    if h is None:
        sdtype = cell.state_dtype(u.unsqueeze(1))
        h = torch.randn(N, cell.state_size, generator=gen, dtype=torch.float64).to(device=device)
        h = h.to(sdtype)
    with torch.no_grad():
        Jd = dense_jacobian(cell, h, u)  # [N, d, d]
        f, Js = cell.step_and_jacobian(h, u)
        f_ref = cell.step(h, u)
    scale = Jd.abs().amax().item() + atol
    d = cell.state_size
    masked = Jd - structure.to_dense(structure.from_dense(Jd), d)
    bad = masked.abs().amax().item()
    if bad > atol + rtol * scale:
        idx = torch.nonzero(masked.abs() == masked.abs().amax())[0].tolist()
        raise ValueError(
            f"{type(cell).__name__} declares structure {structure!s}, but its Jacobian has "
            f"|dh'[{idx[1]}]/dh[{idx[2]}]| = {bad:.3g} outside that structure (at point {idx[0]}). "
            f"Declare a wider structure (e.g. 'dense' or a larger Block)."
        )
    diff = (structure.to_dense(Js, d) - Jd).abs().amax().item()
    if diff > atol + rtol * scale:
        raise ValueError(
            f"{type(cell).__name__}.step_and_jacobian disagrees with autodiff of step: "
            f"max |J - J_autodiff| = {diff:.3g}"
        )
    msg = _holomorphic_error(cell.step, h, u, rtol)
    if msg:
        raise ValueError(f"{type(cell).__name__}: {msg}.")
    fdiff = (f - f_ref).abs().amax().item()
    if fdiff > atol + rtol * (f_ref.abs().amax().item() + atol):
        raise ValueError(
            f"{type(cell).__name__}.step_and_jacobian returns f != step(h, u): max diff {fdiff:.3g}"
        )


class CellCheckError(ValueError):
    """A cell breaks an assumption of the parallel solver (found by the automatic probe)."""


def _holomorphic_error(step, h, u, rtol):
    """A message if ``step`` is not complex-linear in h at (h, u) (its jvp along i·v is not i·(its jvp
    along v)), else None. Real states: None."""
    if not h.is_complex():
        return None
    g = torch.Generator().manual_seed(1)
    v = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h)
    f = lambda hh: step(hh, u)  # noqa: E731
    jv = jvp(f, (h,), (v,))[1]
    jiv = jvp(f, (h,), (1j * v,))[1]
    bad = (jiv - 1j * jv).abs().amax().item()
    if bad > rtol * (jv.abs().amax().item() + 1e-30):
        return (f"its step is not holomorphic in the complex state h (the derivative along i·v differs from "
                f"i times the derivative along v by {bad:.3g}; e.g. it uses h.abs(), h.real or h.conj()). "
                "The solver's complex Jacobians assume complex-linear derivatives: write the state as "
                "real and imaginary parts (a real state of twice the size, Block(2) structure)")
    return None


def is_affine(cell: Cell, h: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether ``step`` is affine in the state, ``f(h, u) = A(u) h + c(u)``, judged by its declared
    Jacobian being the same, bit for bit, at ``h [n, d]`` and at another state (``u [n, *]``).

    The solver starts such a cell's Newton from zeros: one step is then exact up to the scan's
    rounding, where from ``f(h0, u_t)`` the update ``H + δ`` cancels (``|H| >> |h_t|`` at small
    entries) and a second step is needed. A wrong answer here costs Newton steps, never accuracy.
    """
    with torch.no_grad():
        J1 = cell.step_and_jacobian(h, u)[1]
        J2 = cell.step_and_jacobian(0.37 - 2 * h, u)[1]
    return torch.equal(J1, J2)


def verify_cell(cell: Cell, h: torch.Tensor, u: torch.Tensor) -> None:
    """The probe the parallel solver runs once per cell, dtype and device (``check_cell=True``).

    At a few sampled positions ``h [n, d]``, ``u [n, *]`` (n >= 2) it checks, with a few extra
    evaluations of ``step``:

    - determinism: two evaluations of ``step`` agree (Newton re-evaluates every position at
      every iteration, so dropout or other randomness in ``step`` gives wrong gradients);
    - no row coupling: a tangent on one row, or a change of its value, moves no other row's output
      (a normalisation over the batch inside ``step``, even through a detached statistic, breaks
      the per-sequence solve and its gradients);
    - the declared structure: the jvp of ``step`` along a random tangent equals the declared
      Jacobian of ``step_and_jacobian`` applied to it (a too-narrow declaration gives wrong
      gradients even where Newton still converges);
    - complex states: ``step`` is holomorphic in h.

    Raises :class:`CellCheckError` (a ValueError) saying what is wrong and what to do.
    """
    name = type(cell).__name__
    structure = cell.get_structure()
    real = h.real.dtype if h.is_complex() else h.dtype
    rtol = float(torch.finfo(real).eps) ** 0.5  # a hand-written J agrees with autodiff far better
    f = lambda hh: cell.step(hh, u)  # noqa: E731
    f1, f2 = f(h), f(h)
    if not torch.equal(f1, f2) and not bool(torch.isnan(f1).any()):
        raise CellCheckError(
            f"{name}.step is not deterministic (two evaluations at the same (h, u) differ by "
            f"{(f1 - f2).abs().amax().item():.3g}): the parallel solver evaluates step many times per position. "
            "Stochastic layers (dropout) belong in prepare() or output(); mode='sequential' supports them in step.")
    g = torch.Generator().manual_seed(0)
    v = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h)
    one_row = torch.zeros_like(v)
    one_row[0] = v[0]
    moved = jvp(f, (h,), (one_row,))[1][1:].abs().amax().item() if h.shape[0] > 1 else 0.0
    if moved > 0:
        raise CellCheckError(
            f"{name}.step couples batch rows (a change of row 0's state moves other rows' outputs by "
            f"{moved:.3g}; e.g. a normalisation over the batch inside step). Each row of h must be "
            "updated from its own row only: normalise over features, or in prepare()/output().")
    if h.shape[0] > 1:  # the same by value: a detached batch statistic hides from the jvp
        h_other = h.clone()
        h_other[0] = h[0] + (1 + h[0].abs()) * v[0].sgn()
        with torch.no_grad():
            moved = (f(h_other)[1:] - f1[1:]).abs().amax().item()
        if moved > rtol * (1 + f1[1:].abs().amax().item()):
            raise CellCheckError(
                f"{name}.step couples batch rows (changing row 0's state moves other rows' outputs by "
                f"{moved:.3g}, through a value autograd does not see, e.g. h - h.mean(0).detach()). Each "
                "row of h must be updated from its own row only: the parallel solve treats every sequence "
                "on its own. Normalise over features, or in prepare()/output().")
    f_j, J = cell.step_and_jacobian(h, u)
    jv = jvp(f, (h,), (v,))[1]
    scale = structure.matvec(J.abs(), v.abs()) + jv.abs()
    bad = ((jv - structure.matvec(J, v)).abs() - rtol * scale).amax().item()
    if bad > 0 or not torch.allclose(f_j, f1, rtol=rtol, atol=0, equal_nan=True):
        check_structure(cell, u=u, h=h, rtol=rtol, atol=float(torch.finfo(real).tiny))  # names the entry
        raise CellCheckError(
            f"{name}: its declared Jacobian ({structure}) does not match the derivative of step "
            f"(max excess {bad:.3g}); check step_and_jacobian and the structure declaration.")
    msg = _holomorphic_error(cell.step, h, u, rtol)
    if msg:
        raise CellCheckError(f"{name}: {msg}.")
    if gives_scale(cell):
        _check_scale(cell, h, u, f_j, J, rtol)


def _check_scale(cell: Cell, h, u, f, J, rtol) -> None:
    """A cell's own rounding scale (:meth:`Cell.step_jacobian_and_scale`): f and J as
    step_and_jacobian's, s None or real ``[n, d]``, and at least |f| (it bounds f's terms)."""
    name = type(cell).__name__
    f_s, J_s, s = cell.step_jacobian_and_scale(h, u)
    if not (torch.allclose(f_s, f, rtol=rtol, atol=0, equal_nan=True)
            and torch.allclose(J_s, J, rtol=rtol, atol=0, equal_nan=True)):
        raise CellCheckError(f"{name}.step_jacobian_and_scale returns an f or J other than step_and_jacobian's.")
    if s is None:
        return
    if not isinstance(s, torch.Tensor) or s.shape != f.shape or s.is_complex():
        raise CellCheckError(f"{name}.step_jacobian_and_scale: s must be a real tensor of f's shape "
                             f"{list(f.shape)}, got {getattr(s, 'shape', type(s).__name__)}")
    low = (f.abs() * (1 - rtol) - s).amax().item()  # NaN where f is: not flagged here
    if low > 0 or bool((s < 0).any()):
        raise CellCheckError(
            f"{name}.step_jacobian_and_scale: s must be >= |f| (the sum of the absolute values of f's "
            f"terms), but it is below |f| by up to {low:.3g} or negative somewhere.")


class CellFacts:
    """What the one-off probes found about a cell (kept in ``cell.__dict__``): which (dtype, device,
    structure) passed :func:`pararnn.verify.verify_cell`, whether ``prepare`` is per step, and whether
    ``step`` is affine in h (``init="auto"`` reads it).

    The facts belong to the cell's current parameters. They are forgotten when a parameter or
    buffer is replaced, moved or cast (its identity changes) and on ``load_state_dict``
    (:meth:`Cell._load_from_state_dict`); in-place updates (training) renew them on the 1st, 2nd,
    4th, 8th, ... update seen, so a run of n optimiser steps re-probes about log2(n) times (a probe
    costs a few evaluations of ``step``)."""

    def __init__(self, ident):
        self.ident, self.version, self.updates, self.next_check = ident, None, 0, 1
        self.verified: set = set()
        self.affine = False

    @staticmethod
    def of(cell) -> "CellFacts":
        """The cell's facts, renewed first if its parameters changed (see the class docstring)."""
        tensors = [*cell.parameters(), *cell.buffers()]
        ident = tuple((id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for t in tensors)
        version = sum(compat.version_counter(t) for t in tensors)  # (no counter in inference mode)
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


def verify_key(cell, h0: torch.Tensor):
    """What :func:`verify_once` verifies once: the cell at this dtype, device and structure."""
    return h0.dtype, h0.device, str(cell.get_structure())


def verified(cell, h0: torch.Tensor) -> bool:
    return verify_key(cell, h0) in CellFacts.of(cell).verified


def verify_once(cell, u: torch.Tensor, h0: torch.Tensor, n: int = 4) -> None:
    """Run :func:`verify_cell` once per cell, dtype and device, at n sampled positions
    (again after the cell's parameters change: :class:`CellFacts`)."""
    if verified(cell, h0):
        return
    B, T = u.shape[:2]
    b = torch.arange(n, device=u.device) % B
    t = torch.linspace(0, T - 1, n, device=u.device).long()
    with torch.no_grad():
        u_s = u[b, t].detach()  # [n, *]
        h_s = cell.step(h0[b].detach(), u_s)  # a state at the scale the solve will see, [n, d]
    # the cell's math, in full precision; its graphs unseen by an enclosing checkpoint (it saves as many
    # tensors in its recompute, which does not probe again)
    with torch.enable_grad(), torch.autocast(u.device.type, enabled=False), own_saved_tensors():
        verify_cell(cell, h_s, u_s)
        affine = is_affine(cell, h_s, u_s)
    facts = CellFacts.of(cell)
    facts.affine = affine  # init="auto" reads it
    facts.verified.add(verify_key(cell, h0))


def check_prepare_is_per_step(cell, x: torch.Tensor, n: int = 6) -> None:
    """``chunk_size`` prepares each chunk on its own, which is right only if ``prepare`` acts on each
    time step independently: checked once per cell on the first ``n`` steps of one sequence, with
    the caller's random stream and the cell's modes and buffers (a batch norm's running statistics)
    left as they were. In the cell's own mode, each input prepared from the same random state (a
    dropout draws one mask per shape): other values at the first two steps change no later step,
    and at the last two no earlier one (a batch norm over T in training mode fails). In eval mode:
    the steps after the first two, prepared alone, equal them prepared after those two (a
    convolution over T, or a position index, fails)."""
    done = CellFacts.of(cell).verified
    if "prepare_per_step" in done or x.shape[1] < 3:
        return
    xs = x[:1, :n].detach()
    early, late = xs.clone(), xs.clone()
    early[:, :2], late[:, -2:] = xs[:, -2:], xs[:, :2]  # other values, valid ones (token ids too)
    with cell_untouched(cell, x.device):
        u, ue, ul = _prepare_from_one_state(cell, xs, early, late)
        ok = _close(ue[:, 2:], u[:, 2:]) and _close(ul[:, :-2], u[:, :-2])
        cell.eval()
        ok = ok and _close(cell.prepare(xs[:, 2:]), cell.prepare(xs)[:, 2:])
    if not ok:
        raise ValueError(f"chunk_size needs a prepare() that acts on each time step on its own, but "
                         f"{type(cell).__name__}.prepare mixes time steps (e.g. a convolution over T, or a "
                         f"batch norm over T in training mode): chunks would see different inputs. Use "
                         f"chunk_size=None for this cell.")
    done.add("prepare_per_step")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6 * (1 + float(b.abs().max())))


@contextlib.contextmanager
def cell_untouched(cell, device: torch.device):
    """For pararnn's own calls of the cell's code (a probe's ``prepare``): no gradients, the
    caller's random stream untouched (a dropout), and the cell's modes and buffers (a batch norm's
    running statistics) as they were afterwards; a buffer is written back only where it changed."""
    modes = {m: m.training for m in cell.modules()}
    buffers = {k: b.clone() for k, b in cell.named_buffers()}
    try:
        with torch.no_grad(), untouched_rng(device):
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for k, b in cell.named_buffers():
                if k in buffers and not torch.equal(b, buffers[k]):
                    b.copy_(buffers[k])


def _prepare_from_one_state(cell, *xs: torch.Tensor) -> list[torch.Tensor]:
    """``cell.prepare`` of each input, each started from the same random state."""
    start, out = RandomState(xs[0].device), []
    for x in xs:
        start.restore()
        out.append(cell.prepare(x))
    return out


