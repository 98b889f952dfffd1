"""ParaGRU: a GRU whose recurrent weights are diagonal vectors, so df/dh is diagonal."""
from __future__ import annotations

import torch
from torch import nn

from ..cell import Cell
from ..linear import Linear


class ParaGRU(Cell):
    """``z, r = σ(W x + a ⊙ h + b)``, ``c = tanh(W_c x + a_c ⊙ (r ⊙ h) + b_c)``, ``h' = (1-z) h + z c``.

    Input projections run once for all T in :meth:`prepare`: ``x [B, T, D_in] -> u [B, T, 3d]``.
    The Jacobian is diagonal and hand-written (``step_and_jacobian``); it is tested against
    torch.func and is faster than the jvp (see benchmarks/bench_engine.py).

    Args:
        input_size: D_in, the size of ``x [B, T, D_in]``.
        state_size: d, the state ``[B, T, d]``.
        a_scale: standard deviation of the recurrent vectors' initial values.
    """

    structure = "diagonal"
    recurrent_parameters = {"a": "diagonal"}  # see models.contractive

    def __init__(self, input_size: int, state_size: int, a_scale: float = 0.5):
        super().__init__()
        self.input_size, self.state_size = input_size, state_size
        self.proj = Linear(input_size, 3 * state_size)
        self.a = nn.Parameter(torch.empty(3, state_size).uniform_(-a_scale, a_scale))  # [3, d]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [B, T, 3d]

    def _gates(self, h, u):
        uz, ur, uc = u.chunk(3, dim=-1)  # each [N, d]
        az, ar, ac = self.a
        z = torch.sigmoid(uz + az * h)
        r = torch.sigmoid(ur + ar * h)
        c = torch.tanh(uc + ac * (r * h))
        return z, r, c

    def step(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``h [N, d]``, ``u [N, 3d]`` -> ``[N, d]``."""
        z, r, c = self._gates(h, u)
        return torch.lerp(h, c, z)

    def step_and_jacobian(self, h, u):
        """``(f [N, d], diag df/dh [N, d])`` in closed form."""
        return self._closed_form(h, u)[:2]

    def step_jacobian_and_scale(self, h, u):
        """``(f, J, s)``, each ``[N, d]``; ``s = (1-z)|h| + z|c|``, the size of the lerp's two terms,
        which cancel where f ≈ 0 (see :meth:`pararnn.Cell.step_jacobian_and_scale`)."""
        f, J, z, c = self._closed_form(h, u)
        return f, J, torch.lerp(h.abs(), c.abs(), z)

    def _closed_form(self, h, u):
        """``f``, ``diag df/dh`` and the gates z, c, each ``[N, d]``."""
        z, r, c = self._gates(h, u)
        az, ar, ac = self.a
        dz = z * (1 - z) * az
        dr = r * (1 - r) * ar
        dc = (1 - c * c) * ac * (r + h * dr)
        f = torch.lerp(h, c, z)
        J = (1 - z) + (c - h) * dz + z * dc
        return f, J, z, c
