"""`Cell`: the one thing a user writes. ``h_t = step(h_{t-1}, u_t)`` plus a Jacobian structure."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import jacfwd, jvp, vmap

from .structure import Block, Structure, from_dense, normalize_structure, to_dense


class Cell(nn.Module):
    """Base class for a recurrent cell ``h_t = f(h_{t-1}, u_t)``.

    Subclasses set ``state_size`` (d) and ``structure`` (``"diagonal"``, ``pararnn.Block(k)`` or
    ``"dense"``: the sparsity of ``df/dh``) and implement :meth:`step`. Optionally:

    - :meth:`prepare` maps the raw input ``x: [B, T, D_in]`` to ``u: [B, T, *]`` once for all T
      (e.g. every input projection as one matmul). Default: identity.
    - :meth:`step_and_jacobian` returns ``f`` and ``df/dh`` in storage form; the default derives
      the Jacobian from :meth:`step` with torch.func. Override it with a hand-written Jacobian only
      when that is measurably faster, and test it against :func:`autodiff_step_and_jacobian`.
    - ``input_size``: if set, inputs are checked against it.
    - :meth:`output` reads ``y`` from the states (default: the states).

    ``step`` must be a pure function of its arguments and parameters (no in-place updates of its
    inputs, no data-dependent Python control flow): the engine calls it under ``torch.func``
    transforms and on all T positions at once.
    """

    structure: Structure = "diagonal"
    state_size: int
    input_size: int | None = None

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

    @property
    def output_size(self) -> int:
        """Feature size of :meth:`output` (default: ``state_size``)."""
        return self.state_size

    def get_structure(self) -> Structure:
        """The declared structure, validated against ``state_size``."""
        return normalize_structure(self.structure, self.state_size)

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


def autodiff_step_and_jacobian(step, h: torch.Tensor, u: torch.Tensor, structure: Structure):
    """``(f, J)`` of ``step`` at ``(h [N, d], u [N, *])`` by forward-mode autodiff (torch.func).

    - diagonal: one jvp with a ones tangent (exact iff the Jacobian really is diagonal);
    - ``Block(k)``: k jvps with block-periodic one-hot tangents;
    - dense: ``vmap(jacfwd)`` over the batch (for complex states, which jacfwd rejects, the
      same columns by ``vmap`` of ``jvp`` over basis tangents; f must be holomorphic in h).
    """
    f = lambda hh: step(hh, u)  # noqa: E731
    if structure == "diagonal":
        return jvp(f, (h,), (torch.ones_like(h),))
    N, d = h.shape
    if structure == "dense":
        if h.is_complex():  # jacfwd is real-only: push the d basis tangents through jvp (holomorphic f)
            basis = torch.eye(d, dtype=h.dtype, device=h.device)  # [d, d]
            cols = vmap(lambda e: jvp(f, (h,), (e.expand(N, d),))[1])(basis)  # [d(col), N, d(row)]
            return step(h, u), cols.permute(1, 2, 0)
        single = lambda h1, u1: step(h1.unsqueeze(0), u1.unsqueeze(0)).squeeze(0)  # noqa: E731
        J = vmap(jacfwd(single, argnums=0))(h, u)  # [N, d, d]
        return step(h, u), J
    k = structure.k
    cols = []
    out = None
    for j in range(k):
        tangent = torch.zeros(k, dtype=h.dtype, device=h.device)
        tangent[j] = 1
        out, col = jvp(f, (h,), (tangent.repeat(d // k).expand(N, d),))
        cols.append(col.reshape(N, d // k, k))  # [N, m, k]: column j of every block
    J = torch.stack(cols, dim=-1)  # [N, m, k(row), k(col)]
    return out, (J[:, 0] if structure.shared else J)


def dense_jacobian(cell: Cell, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Full ``df/dh`` ``[N, d, d]`` regardless of the declared structure."""
    return autodiff_step_and_jacobian(cell.step, h, u, "dense")[1]


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
    masked = Jd - to_dense(from_dense(Jd, structure), structure, cell.state_size)
    bad = masked.abs().amax().item()
    if bad > atol + rtol * scale:
        idx = torch.nonzero(masked.abs() == masked.abs().amax())[0].tolist()
        raise ValueError(
            f"{type(cell).__name__} declares structure {structure!s}, but its Jacobian has "
            f"|dh'[{idx[1]}]/dh[{idx[2]}]| = {bad:.3g} outside that structure (at point {idx[0]}). "
            f"Declare a wider structure (e.g. 'dense' or a larger Block)."
        )
    diff = (to_dense(Js, structure, cell.state_size) - Jd).abs().amax().item()
    if diff > atol + rtol * scale:
        raise ValueError(
            f"{type(cell).__name__}.step_and_jacobian disagrees with autodiff of step: "
            f"max |J - J_autodiff| = {diff:.3g}"
        )
    fdiff = (f - f_ref).abs().amax().item()
    if fdiff > atol + rtol * (f_ref.abs().amax().item() + atol):
        raise ValueError(
            f"{type(cell).__name__}.step_and_jacobian returns f != step(h, u): max diff {fdiff:.3g}"
        )


__all__ = ["Block", "Cell", "autodiff_step_and_jacobian", "check_structure", "dense_jacobian"]
