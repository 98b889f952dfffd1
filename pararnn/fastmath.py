"""Fast, accurate tanh for the compiled evaluation path (``compile_cell``), as plain torch ops.

Why: inductor's CPU code calls ATen's vectorised ``tanh`` (SLEEF, 1 ulp), which costs several
exps (``benchmarks/bench_constants.py`` times both); a ParaGRU evaluation has one tanh. XLA's CPU
backend uses its own approximation for the same reason.

The formula (odd in x, so only |x| is approximated):

- ``|x| < 0.55``: ``x + x³·P(x²)``, P of degree 4. Its coefficients minimise the relative error
  of tanh on [0, 0.55] (iteratively reweighted least squares at 4000 Chebyshev nodes against
  mpmath's tanh; the fit's max relative error is 1.0e-9, far below fp32's 6e-8 unit roundoff).
- ``|x| >= 0.55``: ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|) <= 0.333``, sign copied from x.
  ``1 - e`` then loses at most a bit, and e never overflows (|x| = inf gives e = 0 and ±1).

Relative error against float64 tanh, on 800 000 points of a log grid from 1e-45 to 20 (both
signs) and around the split: at most 1.5e-7 measured, below 2·eps = 2.4e-7 (the bound that
tests/solver/test_fastmath.py checks, eagerly and compiled; SLEEF's: 6e-8); tanh(x) = x exactly at the
subnormals; NaN stays NaN, ±inf gives ±1, -0.0 stays -0.0. The derivative is tanh's own,
``1 - y²`` from the output (a custom autograd.Function), not the derivative of the approximation.

:func:`compile_backend` is the torch.compile backend of the compiled pieces: it rewrites every
``torch.tanh`` / ``Tensor.tanh`` / ``F.tanh`` of the captured graph into :func:`tanh` and hands
the graph to inductor. The rewrite is in the graph itself, so inductor's and AOT autograd's caches
key on it (a decomposition table is not part of AOT autograd's cache key). The eager path, the
reference twin, keeps ``torch.tanh``.
"""
from __future__ import annotations

import functools
import hashlib

import torch

from . import compat

SPLIT = 0.55  # below: the polynomial; at and above: the exp form
# P(s), s = x², lowest degree first: tanh(x) ≈ x + x³ P(x²) on |x| < SPLIT (see the module docstring)
POLY = (-0.33333317562729603, 0.13332586225913973, -0.05385231796969517, 0.02107170896648837,
        -0.006274278316615204)


def tanh_formula(x: torch.Tensor) -> torch.Tensor:
    """The forward formula, elementwise on any real floating ``x``; see the module docstring."""
    a = x.abs()
    e = torch.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    s = a.clamp(max=SPLIT)  # the polynomial only where it is used: no overflow of a³ elsewhere
    s2 = s * s
    p = s2 * POLY[-1] + POLY[-2]  # Horner
    for c in POLY[-3::-1]:
        p = p * s2 + c
    small = s + s * s2 * p
    return torch.copysign(torch.where(a < SPLIT, small, big), x)  # NaN: a < SPLIT is False, big is NaN


class _Tanh(torch.autograd.Function):
    """:func:`tanh_formula` with tanh's exact derivative ``1 - y²`` in reverse and forward mode
    (torch.func.jvp: cells whose Jacobian comes from :func:`pararnn.cell.autodiff_step_and_jacobian`)
    and a generated vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return tanh_formula(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1.0 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1.0 - y * y)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh (``[*] -> [*]``), the same as ``torch.tanh`` to a few float32 ulp; differentiable.
    The polynomial is a float32 one: float64 inputs take ``torch.tanh`` (the formula is 1e-9 off there)."""
    if x.dtype == torch.float64:
        return torch.tanh(x)
    return _Tanh.apply(x)


# torch.ops.aten.tanh: a user cell's step traced with its Jacobian (solver.compile.traced_jacobian)
# reaches the captured graph as aten ops
_TANH_TARGETS = (torch.tanh, torch.nn.functional.tanh, torch.ops.aten.tanh.default, torch.ops.aten.tanh)


def rewrite_tanh(gm: torch.fx.GraphModule) -> int:
    """Replace the tanh calls of a dynamo-captured graph by :func:`tanh`; returns how many."""
    n = 0
    for node in gm.graph.nodes:
        is_fn = node.op == "call_function" and node.target in _TANH_TARGETS
        is_method = node.op == "call_method" and node.target == "tanh"
        if (is_fn or is_method) and len(node.args) == 1 and not node.kwargs:
            node.op, node.target = "call_function", tanh
            n += 1
    if n:
        gm.recompile()
    return n


@functools.cache
def _source_hash() -> str:
    """A hash of this module's source: the version of :func:`tanh` in the compile caches' keys."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def compile_backend(gm: torch.fx.GraphModule, example_inputs):
    """torch.compile backend: :func:`rewrite_tanh`, then inductor. The rewritten graph stays
    cacheable across processes: :func:`tanh` is marked cacheable, keyed by a hash of its source."""
    rewrite_tanh(gm)
    with compat.cacheable_functions({f"{tanh.__module__}.{tanh.__name__}": _source_hash()}):
        return compat.inductor_compile_fx()(gm, example_inputs)
