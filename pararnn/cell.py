"""`Cell`: the one thing a user writes. ``h_t = step(h_{t-1}, u_t)`` plus a Jacobian structure."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import jvp, vmap

from .structure import Block, Dense, Diagonal, Structure, as_structure


class Cell(nn.Module):
    """Base class for a recurrent cell ``h_t = f(h_{t-1}, u_t)``.

    Subclasses set ``state_size`` (d) and ``structure`` (``"diagonal"``, ``pararnn.Block(k)`` or
    ``"dense"``: the sparsity of ``df/dh``) and implement :meth:`step`. Optionally:

    - :meth:`prepare` maps the raw input ``x: [B, T, D_in]`` to ``u: [B, T, *]`` once for all T
      (e.g. every input projection as one matmul). Default: identity.
    - :meth:`step_and_jacobian` returns ``f`` and ``df/dh`` in storage form; the default derives
      the Jacobian from :meth:`step` with torch.func. Override it with a hand-written Jacobian only
      when that is measurably faster, and test it against :func:`autodiff_step_and_jacobian`.
    - :meth:`step_jacobian_and_scale` adds f's rounding scale, for cells whose f sums terms that
      can cancel (a gated lerp): the Newton test then sees what rounds, and stops a step earlier.
    - ``input_size``: if set, inputs are checked against it.
    - :meth:`output` reads ``y`` from the states (default: the states).

    ``step`` must be a pure function of its arguments and parameters (no in-place updates of its
    inputs, no data-dependent Python control flow): the engine calls it under ``torch.func``
    transforms and on all T positions at once.
    """

    structure: Structure | str = "diagonal"
    state_size: int
    input_size: int | None = None

    def __getstate__(self):
        # pickles and deep copies leave the probes' facts behind (they name this object's tensors)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_pararnn_facts"}

    def _load_from_state_dict(self, *args, **kwargs):
        # new weights: what the solver's probes found about the old ones no longer holds
        self.__dict__.pop("_pararnn_facts", None)
        super()._load_from_state_dict(*args, **kwargs)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, T, D_in] -> u: [B, T, *]``. Default: identity."""
        return x

    def step(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One step. ``h: [N, d]``, ``u: [N, *]`` -> ``h_next: [N, d]`` (N is any batch)."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(h, u)")

    def step_and_jacobian(self, h: torch.Tensor, u: torch.Tensor):
        """``(f, J)``: ``f = step(h, u)`` ``[N, d]`` and ``J = df/dh`` in storage form
        (``[N, d]`` diagonal, ``[N, d/k, k, k]`` block, ``[N, d, d]`` dense)."""
        return autodiff_step_and_jacobian(self.step, h, u, self.get_structure())

    def step_jacobian_and_scale(self, h: torch.Tensor, u: torch.Tensor):
        """``(f, J, s)``: :meth:`step_and_jacobian` and ``s [N, d]`` (>= 0), the size of the terms
        that are added to form f, per entry, or None (the default).

        The Newton test passes an entry when ``|r| <= atol + rtol·(|J| |h| + max(|f|, s))``
        (:class:`pararnn.SolverOptions`): the rounding scale of evaluating f. Without s it reads
        ``|f|``, which misses terms that cancel: where ``f = (1-z) h + z c`` is near 0 from two
        large terms, f still rounds at ``eps·((1-z)|h| + z|c|)``, and the test would ask for a
        residual below what f's own rounding allows (one more Newton step that changes nothing
        measurable). Give the triangle bound of f's last sum, e.g. ``(1-z)·|h| + z·|c|``: an s
        larger than what really rounds would let an inaccurate iterate pass.
        """
        f, J = self.step_and_jacobian(h, u)
        return f, J, None

    @property
    def output_size(self) -> int:
        """Feature size of :meth:`output` (default: ``state_size``)."""
        return self.state_size

    def get_structure(self) -> Structure:
        """The declared structure, validated against ``state_size``."""
        return as_structure(self.structure, self.state_size)

    def initial_state(self, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Default h0: zeros ``[B, d]``."""
        return torch.zeros(batch, self.state_size, dtype=dtype, device=device)

    def state_dtype(self, u: torch.Tensor) -> torch.dtype:
        """dtype of the state for prepared input u (override for complex states)."""
        return u.dtype

    def output(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Read the output from the states: ``h [B, T, d]``, ``x [B, T, D_in]`` -> ``y [B, T, *]``.

        Default: the state itself. Cells whose state has several parts (LSTM's (h, c)) or a
        readout (LRU's ``Re(C h) + D x``) override it. Gradients flow through it normally.
        """
        return h


def autodiff_step_and_jacobian(step, h: torch.Tensor, u: torch.Tensor, structure):
    """``(f, J)`` of ``step`` at ``(h [N, d], u [N, *])`` by forward-mode autodiff (torch.func).

    The structure supplies P probe tangents (diagonal: one ones vector, exact iff J really is
    diagonal; ``Block(k)``: k block-periodic one-hots; dense: the d unit vectors) and assembles J
    from their jvps. Up to :data:`LOOP_PROBES` probes are pushed one by one, more through
    ``vmap``. For complex states f must be holomorphic in h.
    """
    N, d = h.shape
    structure = as_structure(structure, d)
    f = lambda hh: step(hh, u)  # noqa: E731
    tangents = structure.probe_tangents(N, d, h.dtype, h.device)  # [P, N, d]
    compiling = torch.compiler.is_compiling()
    # make_dual cannot trace views with symbolic storage offsets (torch.compile, dynamic); eagerly,
    # on h sharing a larger storage (a piece of the solver's state buffer) it costs the whole
    # storage (ParaGRU B=8, T=4096, d=256 pieces of 1024 rows: 19 ms a jvp against 2.6 ms on a copy)
    if compiling or h.untyped_storage().nbytes() > h.numel() * h.element_size():
        h = h.clone()
    if tangents.shape[0] <= LOOP_PROBES:
        cols = []
        for e in tangents.unbind(0):
            e = e.clone() if compiling else e
            out, col = jvp(f, (h,), (e,))
            cols.append(col.unsqueeze(0))
        return out, structure.assemble(cols[0] if len(cols) == 1 else torch.cat(cols), d)
    cols = vmap(lambda e: jvp(f, (h,), (e,))[1])(tangents)  # [P, N, d]
    return step(h, u), structure.assemble(cols, d)


# Probes pushed through jvp one at a time (k jvps of a Block(k) cell cost about what one vmapped
# call does for small k, and a loop works for any step); wider structures are vmapped.
LOOP_PROBES = 8


def dense_jacobian(cell: Cell, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Full ``df/dh`` ``[N, d, d]`` regardless of the declared structure."""
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


def uses_jvp(cell: Cell | None) -> bool:
    """Whether the cell's Jacobian comes from torch.func.jvp (it keeps the default
    :meth:`Cell.step_and_jacobian`; None: False)."""
    return cell is not None and type(cell).step_and_jacobian is Cell.step_and_jacobian


def gives_scale(cell: Cell) -> bool:
    """Whether the cell overrides :meth:`Cell.step_jacobian_and_scale` (gives f's rounding scale)."""
    return type(cell).step_jacobian_and_scale is not Cell.step_jacobian_and_scale


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


__all__ = ["Block", "Cell", "CellCheckError", "verify_cell", "is_affine", "Dense", "Diagonal", "autodiff_step_and_jacobian", "check_structure", "dense_jacobian"]
