"""Selective (Mamba-like) diagonal SSM with input-dependent decay in [0, 1] or [-1, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cell import Cell
from ..linear import Linear

RANGES = ("[0,1]", "[-1,1]")


class DiagonalLinear(Cell):
    """Base of the input-dependent diagonal linear cells: ``u = [a, b]``, ``h' = a ⊙ h + b``."""

    structure = "diagonal"

    def step(self, h, u):
        a, b = u.chunk(2, -1)
        return a * h + b

    def step_and_jacobian(self, h, u):
        a, b = u.chunk(2, -1)
        return a * h + b, a


class SelectiveSSM(DiagonalLinear):
    """``h' = a_t ⊙ h + Δ_t ⊙ (W_B x_t)``, ``a_t = exp(-Δ_t ⊙ exp(w))``, ``Δ_t = softplus(W_Δ x_t + b_Δ)``.

    ``eigenvalue_range="[-1,1]"`` maps ``a -> 2a - 1`` (Grazzi et al.), which lets a diagonal
    linear RNN flip signs (parity). ``x [B, T, input_size]`` -> state ``[B, T, state_size]``.
    Linear in h: Newton is exact in one step.

    Args:
        input_size: D_in, the size of ``x [B, T, D_in]``.
        state_size: d, the state ``[B, T, d]``.
        eigenvalue_range: ``"[0,1]"`` or ``"[-1,1]"``.
    """

    def __init__(self, input_size: int, state_size: int, eigenvalue_range: str = "[0,1]"):
        super().__init__()
        if eigenvalue_range not in RANGES:
            raise ValueError(f"eigenvalue_range must be one of {RANGES}, got {eigenvalue_range!r}")
        self.input_size, self.state_size, self.eigenvalue_range = input_size, state_size, eigenvalue_range
        self.dt = Linear(input_size, state_size)
        self.inp = Linear(input_size, state_size)
        self.w = nn.Parameter(torch.log(torch.linspace(0.5, 4.0, state_size)))

    def transitions(self, x):
        """``(a [B, T, d], Δ [B, T, d])`` for input ``x [B, T, input_size]``."""
        delta = F.softplus(self.dt(x))
        a = torch.exp(-delta * torch.exp(self.w))  # in (0, 1]
        return (2 * a - 1 if self.eigenvalue_range == "[-1,1]" else a), delta

    def prepare(self, x):
        a, delta = self.transitions(x)
        return torch.cat([a, delta * self.inp(x)], -1)  # [B, T, 2d]


class ComplexSSM(DiagonalLinear):
    """Selective complex diagonal SSM: ``h' = a_t ⊙ h + Δ_t ⊙ (W_B x_t)`` with input-dependent
    ``a_t = exp(-Δ_t ⊙ exp(w)) · exp(i θ_t)``, ``θ_t = W_θ x_t``, ``Δ_t = softplus(W_Δ x_t + b_Δ)``.

    Unlike :class:`LRU` (time-invariant λ), the rotation depends on the input, so the state can
    turn by a different angle for each token (e.g. ±120° for counting mod 3). ``x [B, T, D_in]``
    -> complex state ``[B, T, N]`` -> ``y = [Re h, Im h]`` ``[B, T, 2N]``. Linear in h.

    Args:
        input_size: D_in, the size of ``x [B, T, D_in]``.
        state_size: d, the complex state ``[B, T, d]``.
    """

    def __init__(self, input_size: int, state_size: int):
        super().__init__()
        self.input_size, self.state_size = input_size, state_size
        self.dt = Linear(input_size, state_size)
        self.theta = Linear(input_size, state_size)
        self.inp = Linear(input_size, 2 * state_size)
        self.w = nn.Parameter(torch.log(torch.linspace(0.5, 4.0, state_size)))

    @property
    def output_size(self) -> int:
        return 2 * self.state_size

    def transitions(self, x):
        """``(a [B, T, N] complex, Δ [B, T, N])``; ``|a| <= 1``."""
        dt = self.w.dtype  # polar/complex need the parameters' precision (autocast may give bf16)
        delta = F.softplus(self.dt(x)).to(dt)
        return torch.polar(torch.exp(-delta * torch.exp(self.w)), self.theta(x).to(dt)), delta

    def prepare(self, x):
        a, delta = self.transitions(x)
        re, im = self.inp(x).to(self.w.dtype).chunk(2, -1)
        return torch.cat([a, delta * torch.complex(re, im)], -1)  # [B, T, 2N] complex

    def output(self, h, x):
        return torch.cat([h.real, h.imag], -1)
