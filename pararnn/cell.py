"""`Cell`: the one thing a user writes. ``h_t = step(h_{t-1}, u_t)`` plus a Jacobian structure."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import jvp, vmap

from .structure import Structure, as_structure
from .utils.functional import autodiff_outside_inference, inference_mode_on, own_saved_tensors


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

    Attributes:
        state_size (int): d, the size of the state ``h [N, d]``.
        structure (str | Structure): the sparsity of ``df/dh``: ``"diagonal"`` (default),
            :class:`pararnn.Block` ``(k)`` or ``"dense"``.
        input_size (int | None): if set, the last dim of ``x`` is checked against it.

    Example:
        >>> class MyCell(pararnn.Cell):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.state_size = d
        ...         self.a = torch.nn.Parameter(torch.rand(d))
        ...     def step(self, h, u):          # h [N, d], u [N, d] -> [N, d]
        ...         return torch.tanh(self.a * h + u)
        >>> y, h_T = pararnn.RNN(MyCell(8))(torch.randn(2, 100, 8))   # y [2, 100, 8], h_T [2, 8]
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
        """Map the raw inputs to the step's inputs, once for all T (default: identity).

        Args:
            x: ``[B, T, D_in]`` inputs.

        Returns:
            ``u [B, T, *]``: what :meth:`step` reads at each step (e.g. every input projection
            as one matmul). It must act on each time step on its own.
        """
        return x

    def step(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One step of the recurrence, ``f(h_{t-1}, u_t)``: the one method a cell must implement.

        Args:
            h: ``[N, d]`` previous states (N is any number of rows: batch entries, time steps or both).
            u: ``[N, *]`` prepared inputs of the same rows.

        Returns:
            ``[N, d]``: the next states.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement step(h, u)")

    def step_and_jacobian(self, h: torch.Tensor, u: torch.Tensor):
        """The step and its Jacobian ``df/dh`` (default: by torch.func from :meth:`step`).

        Args:
            h: ``[N, d]`` previous states.
            u: ``[N, *]`` prepared inputs.

        Returns:
            ``(f, J)``: ``f = step(h, u)`` ``[N, d]`` and ``J = df/dh`` in storage form
            (``[N, d]`` diagonal, ``[N, d/k, k, k]`` block, ``[N, d, d]`` dense).
        """
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

        Args:
            h: ``[N, d]`` previous states.
            u: ``[N, *]`` prepared inputs.

        Returns:
            ``(f, J, s)``: as :meth:`step_and_jacobian`, and ``s [N, d]`` or None.
        """
        f, J = self.step_and_jacobian(h, u)
        return f, J, None

    @property
    def output_size(self) -> int:
        """Feature size of :meth:`output` (default: ``state_size``)."""
        return self.state_size

    def get_structure(self) -> Structure:
        """The declared structure, validated against ``state_size``.

        Returns:
            A :class:`pararnn.Structure` (``Diagonal``, ``Block`` or ``Dense``).
        """
        return as_structure(self.structure, self.state_size)

    def initial_state(self, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The initial state used when the caller passes no ``h0`` (default: zeros).

        Args:
            batch: B.
            dtype: the state's dtype (see :meth:`state_dtype`).
            device: the state's device.

        Returns:
            ``h0 [B, d]``.
        """
        return torch.zeros(batch, self.state_size, dtype=dtype, device=device)

    def state_dtype(self, u: torch.Tensor) -> torch.dtype:
        """The state's dtype for these prepared inputs (override for complex states).

        Args:
            u: ``[B, T, *]`` prepared inputs.

        Returns:
            A torch.dtype (default: ``u.dtype``).
        """
        return u.dtype

    def output(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Read the output from the states (default: the states themselves).

        Cells whose state has several parts (LSTM's (h, c)) or a readout (LRU's ``Re(C h) + D x``)
        override it. Gradients flow through it normally.

        Args:
            h: ``[B, T, d]`` states h_1..h_T.
            x: ``[B, T, D_in]`` raw inputs.

        Returns:
            ``y [B, T, output_size]``.
        """
        return h


def autodiff_step_and_jacobian(step, h: torch.Tensor, u: torch.Tensor, structure):
    """``(f, J)`` of ``step`` at ``(h [N, d], u [N, *])`` by autodiff.

    The structure supplies P probe vectors (diagonal: one ones vector, exact iff J really is
    diagonal; ``Block(k)``: k block-periodic one-hots; dense: the d unit vectors) and assembles J
    from their products with J. Where no graph of J is wanted (grad mode off, h and u not
    requiring grad, a real dtype, not under torch.compile: the solver's eager evaluation) the
    products are vector-Jacobian products of one reverse-mode graph (``torch.autograd.grad``: rows
    of J, one backward per probe, batched beyond :data:`LOOP_PROBES`), which costs about a tenth
    of torch.func's forward mode on CPU (a GRU-like cell, N = 256, d = 32: 0.33 against 3.0 ms).
    Otherwise forward mode (``torch.func.jvp``: columns; up to :data:`LOOP_PROBES` probes one by
    one, more through ``vmap``), which keeps J differentiable. Under :func:`torch.inference_mode`
    (where reverse mode records nothing and torch 2.11's forward mode gives zero tangents) the
    products are taken with inference mode off, on copies of h and u: by reverse mode, or forward
    mode where ``step`` reads tensors made in inference mode. For complex states f must be
    holomorphic in h.

    Args:
        step: ``step(h [N, d], u [N, *]) -> [N, d]``.
        h: ``[N, d]`` states.
        u: ``[N, *]`` prepared inputs.
        structure: a :class:`pararnn.Structure` or its name.

    Returns:
        ``(f [N, d], J)``, J in the structure's storage form (``[N, d]``, ``[N, d/k, k, k]`` or
        ``[N, d, d]``).
    """
    structure = as_structure(structure, h.shape[-1])
    if inference_mode_on():  # reverse mode records nothing there: the products are taken outside it, on copies
        with autodiff_outside_inference():
            return _autodiff(step, h.clone(), u.clone(), structure)
    return _autodiff(step, h, u, structure)


def _autodiff(step, h: torch.Tensor, u: torch.Tensor, structure):
    """:func:`autodiff_step_and_jacobian` outside inference mode: reverse mode where no graph of J
    is wanted and ``step`` reads no tensor made in inference mode (reverse mode cannot save one
    for backward), else forward mode."""
    N, d = h.shape
    tangents = structure.probe_tangents(N, d, h.dtype, h.device)  # [P, N, d]
    compiling = torch.compiler.is_compiling()
    graph = compiling or torch.is_grad_enabled() or h.requires_grad or u.requires_grad
    if not (graph or h.is_complex() or u.is_complex() or _reads_inference_tensors(step)):
        try:
            return _reverse_mode(step, h, u, structure, tangents)
        except RuntimeError:  # e.g. step read another tensor made in inference mode; an error of step's own raises again
            pass
    return _forward_mode(step, h, u, structure, tangents, compiling)


def _reads_inference_tensors(step) -> bool:
    """Whether ``step``, a module's bound method, reads parameters or buffers made under
    :func:`torch.inference_mode` (reverse mode cannot save them for backward; forward mode can)."""
    owner = getattr(step, "__self__", None)
    return isinstance(owner, nn.Module) and any(t.is_inference() for t in (*owner.parameters(), *owner.buffers()))


def _forward_mode(step, h: torch.Tensor, u: torch.Tensor, structure, tangents: torch.Tensor, compiling: bool):
    """:func:`autodiff_step_and_jacobian` by ``torch.func.jvp``: columns ``J e`` per probe
    (``tangents [P, N, d]``), assembled; J keeps a graph where its inputs have one."""
    d = h.shape[-1]
    f = lambda hh: step(hh, u)  # noqa: E731
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


def _reverse_mode(step, h: torch.Tensor, u: torch.Tensor, structure, probes: torch.Tensor):
    """:func:`autodiff_step_and_jacobian` without a graph of J: rows ``e^T J`` of one backward
    graph of ``step`` per probe ``e`` (``probes [P, N, d]``), assembled and transposed."""
    d = h.shape[-1]
    # an enclosing activation checkpoint (chunk_size) must not count or keep what this graph saves
    with torch.enable_grad(), own_saved_tensors():
        hh = h.detach().requires_grad_()
        out = step(hh, u)
        P = probes.shape[0]
        if not out.requires_grad:  # f does not depend on h (nor on anything with a graph): J = 0
            rows = torch.zeros_like(probes)
        elif P <= LOOP_PROBES:
            rows = torch.stack([torch.autograd.grad(out, hh, e, retain_graph=i < P - 1, allow_unused=True,
                                                    materialize_grads=True)[0]
                                for i, e in enumerate(probes.unbind(0))])
        else:
            rows = torch.autograd.grad(out, hh, probes, is_grads_batched=True, allow_unused=True,
                                       materialize_grads=True)[0]  # [P, N, d]
    return out.detach(), structure.transpose(structure.assemble(rows, d))


# Probes pushed through jvp one at a time (k jvps of a Block(k) cell cost about what one vmapped
# call does for small k, and a loop works for any step); wider structures are vmapped.
LOOP_PROBES = 8


def uses_jvp(cell: Cell | None) -> bool:
    """Whether the cell's Jacobian comes from torch.func.jvp (it keeps the default
    :meth:`Cell.step_and_jacobian`; None: False)."""
    return cell is not None and type(cell).step_and_jacobian is Cell.step_and_jacobian


def gives_scale(cell: Cell) -> bool:
    """Whether the cell overrides :meth:`Cell.step_jacobian_and_scale` (gives f's rounding scale)."""
    return type(cell).step_jacobian_and_scale is not Cell.step_jacobian_and_scale


__all__ = ["Cell", "autodiff_step_and_jacobian", "gives_scale", "uses_jvp"]
