"""``linear(x, weight, bias)``: F.linear, through oneDNN for large fp32 CPU products (the cells' input projections).

A cell's ``prepare`` projects all T inputs at once (``x [B, T, D_in] -> u [B, T, k·d]``): one GEMM
that is a fixed share of every solve, parallel or sequential. On x86 CPUs oneDNN's inner product
(``torch.ops.mkldnn._linear_pointwise``, through :mod:`pararnn.compat`) was faster than MKL's
sgemm for these shapes (``benchmarks/bench_constants.py`` measures both on the machine at hand).
``linear`` takes oneDNN for the forward and ``dL/dx`` and keeps MKL's mm for ``dL/dW``, only for
fp32 CPU tensors with at least :data:`ONEDNN_MIN_MACS` multiply-adds (oneDNN's fixed cost per call
is larger), outside autocast and torch.func transforms. Everything else, and any build without
oneDNN, is ``F.linear`` itself, which is also the reference twin the tests compare with.

The oneDNN path is the custom op ``pararnn::linear`` (a fake implementation for torch.compile, a
registered autograd whose backward is differentiable again).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import compat

# rows·D_in·D_out below this stay on F.linear: above it oneDNN wins on the Intel and AMD VMs alike
# (benchmarks/bench_constants.py; results/calibration_history.md)
ONEDNN_MIN_MACS = 1 << 24

_onednn = compat.onednn_linear()


@torch.library.custom_op("pararnn::linear", mutates_args=())
def _linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [..., D_in] @ weight[D_out, D_in]ᵀ + bias [D_out]`` by oneDNN's inner product."""
    return _onednn(x, weight, bias, "none", [], "")


@_linear_onednn.register_fake
def _linear_fake(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _linear_backward(ctx, g):
    x, weight = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = linear(g, weight.t())  # [..., D_in]
    g2 = g.reshape(-1, g.shape[-1])  # [N, D_out]
    if ctx.needs_input_grad[1]:
        gw = g2.t() @ x.reshape(-1, x.shape[-1])  # [D_out, D_in]: MKL, faster than oneDNN for this shape
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = g2.sum(0)  # [D_out]
    return gx, gw, gb


_linear_onednn.register_autograd(_linear_backward, setup_context=_setup_context)


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`linear` takes oneDNN for these arguments (see the module docstring)."""
    if _onednn is None or x.device.type != "cpu" or weight.dim() != 2 or x.dim() < 1:
        return False
    if any(t.dtype != torch.float32 for t in (x, weight) + (() if bias is None else (bias,))):
        return False
    if torch.is_autocast_enabled("cpu") or compat.functorch_transforms_active():
        return False
    d_out, d_in = weight.shape
    return d_in > 0 and x.numel() * d_out >= ONEDNN_MIN_MACS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., D_in]``, ``weight [D_out, D_in]``, ``bias [D_out]``
    or None -> ``[..., D_out]``; oneDNN where :func:`uses_onednn` says so."""
    if uses_onednn(x, weight, bias):
        return _linear_onednn(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` (same parameters, initialisation and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


__all__ = ["Linear", "ONEDNN_MIN_MACS", "linear", "uses_onednn"]
