"""The compiled cell evaluation: every torch.compile use of the solver, in one place.

The private torch APIs it needs (dynamo's recompile limit, duck shapes, ``mark_static``) come
from :mod:`pararnn.compat`.
"""
from __future__ import annotations

import types
import warnings

import torch

from .. import compat, fastmath
from ..cell import uses_jvp

_COMPILED = {}


def compiled_piece(fn, cell=None):
    """``fn`` (:func:`~pararnn.solver.evaluate.evaluate_piece`, ``step_piece`` or ``graph_piece``)
    under ``torch.compile(dynamic=True)``: inductor fuses the cell, the stores into the solver's
    buffers and the reductions into one loop (C++/OpenMP on CPU, Triton on CUDA). Batch and time
    sizes are dynamic and feature sizes static (:func:`static_features`), so dynamo compiles once
    per cell class, parameter shapes, structure, dtype, device and kind of piece, not per B or T.
    The backend (:func:`pararnn.fastmath.compile_backend`) swaps tanh for the fast one.

    Each cell class gets its own copy of ``fn``'s code, so its own dynamo cache and a budget of
    :data:`RECOMPILE_LIMIT` graphs (dynamo's own limit for a jvp-Jacobian cell, which recompiles
    per (B, T), see :func:`warn_jvp_recompiles`): with one shared code object a few cells used
    dynamo's limit up and later ones ran eagerly. While a compiled piece runs, dynamo's recompile
    limit and duck-shape setting are set for it and restored after (:mod:`pararnn.compat`):
    without duck shapes dynamo does not guard on chance equalities between the pieces' storage
    offsets and sizes."""
    kind = None if cell is None else type(cell)
    if (fn, kind) not in _COMPILED:
        own = fn if kind is None else types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                                           fn.__defaults__, fn.__closure__)
        compiled = torch.compile(own, dynamic=True, backend=fastmath.compile_backend)
        # context managers made once and re-entered on every call (each patch() builds a class: ~20 µs)
        no_duck_shapes = compat.no_duck_shapes()
        limit = compat.dynamo_recompile_limit()
        budget = compat.recompile_budget(limit if uses_jvp(cell) else max(RECOMPILE_LIMIT, limit))

        def run(*args):
            with no_duck_shapes, budget:
                return compiled(*args)

        _COMPILED[(fn, kind)] = run
    return _COMPILED[(fn, kind)]


# Graphs one piece function may hold per cell class: 3 measure variants × 3 kinds of piece × mask
# or not × dtypes × layer sizes (tests/solver/test_compile.py counts them).
RECOMPILE_LIMIT = 64


def static_features(first: int, *tensors: torch.Tensor) -> None:
    """Mark the feature dims (``first`` on) of these inputs static for dynamo; the batch and time
    dims before them stay dynamic (a cell's ``u.chunk(3, -1)`` of a symbolic width gives inductor
    loops of different symbolic lengths, which it does not fuse)."""
    for t in tensors:
        for dim in range(first, t.dim()):
            compat.mark_static(t, dim)


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


