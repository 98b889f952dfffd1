"""LRU (Orvieto et al. 2023): complex diagonal linear recurrence with ring init and γ-normalisation."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..cell import Cell


class LRU(Cell):
    """``h' = λ ⊙ h + γ ⊙ (B x)``, ``λ = exp(-exp(ν) + iθ)``, ``γ = sqrt(1 - |λ|²)``;
    output ``y = Re(C h) + D ⊙ x``.

    ``x [B, T, H]`` -> complex state ``[B, T, N]`` -> ``y [B, T, H]``. |λ| is drawn uniformly on
    the ring ``r_min <= |λ| <= r_max`` (by area), phases in ``[0, max_phase]``. Linear in h:
    Newton is exact in one step.

    Args:
        input_size: H, the size of ``x [B, T, H]`` and of ``y``.
        state_size: N, the complex state ``[B, T, N]``.
        r_min: smallest |λ| of the initial ring.
        r_max: largest |λ|.
        max_phase: largest initial phase.
    """

    structure = "diagonal"

    def __init__(self, input_size: int, state_size: int, r_min: float = 0.0, r_max: float = 1.0,
                 max_phase: float = 2 * math.pi):
        super().__init__()
        if not 0 <= r_min < r_max <= 1:
            raise ValueError(f"need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        self.input_size, self.state_size = input_size, state_size
        u1, u2 = torch.rand(state_size), torch.rand(state_size)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)))
        self.theta_log = nn.Parameter(torch.log(max_phase * u2))
        s = 1 / math.sqrt(2 * input_size)
        self.B_re = nn.Parameter(torch.randn(state_size, input_size) * s)
        self.B_im = nn.Parameter(torch.randn(state_size, input_size) * s)
        c = 1 / math.sqrt(state_size)
        self.C_re = nn.Parameter(torch.randn(input_size, state_size) * c)
        self.C_im = nn.Parameter(torch.randn(input_size, state_size) * c)
        self.D = nn.Parameter(torch.randn(input_size))

    def eigenvalues(self) -> torch.Tensor:
        """λ ``[N]`` (complex)."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def state_dtype(self, u):
        return u.dtype  # prepare already returns the complex dtype

    def initial_state(self, batch, dtype, device):
        return torch.zeros(batch, self.state_size, dtype=dtype, device=device)

    def prepare(self, x):
        lam = self.eigenvalues()
        gamma = torch.sqrt(1 - lam.abs() ** 2)  # [N]
        dt = self.B_re.dtype  # complex parts in the parameters' precision (autocast may give bf16)
        Bx = torch.complex((x @ self.B_re.T).to(dt), (x @ self.B_im.T).to(dt))  # [B, T, N]
        return gamma * Bx

    def step(self, h, u):
        return self.eigenvalues() * h + u

    def step_and_jacobian(self, h, u):
        lam = self.eigenvalues()
        return lam * h + u, lam.expand_as(h)

    @property
    def output_size(self) -> int:
        return self.input_size

    def output(self, h, x):
        return h.real @ self.C_re.T - h.imag @ self.C_im.T + self.D * x  # Re(C h) + D x
