"""Elman tanh RNN: h' = tanh(W_ih x + b_ih + W_hh h + b_hh) (torch.nn.RNN's equations)."""
from __future__ import annotations

import torch
from torch import nn

from ..cell import Cell
from ..linear import linear
from ._common import head_mask, head_structure, recurrent_weight


class Elman(Cell):
    """Elman RNN cell, ``x [B, T, input_size]`` -> state ``[B, T, hidden_size]``.

    ``heads > 1`` makes ``W_hh`` block-diagonal (structure ``Block(hidden/heads)``).

    Args:
        input_size: D_in, the size of ``x [B, T, D_in]``.
        hidden_size: H, the state ``[B, T, H]``.
        heads: block-diagonal ``W_hh`` with this many blocks (1: dense).
        nonlinearity: ``"tanh"`` or ``"relu"``.
    """

    recurrent_parameters = {"weight_hh": "matrix"}  # see models.contractive

    def __init__(self, input_size: int, hidden_size: int, heads: int = 1, nonlinearity: str = "tanh"):
        super().__init__()
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.input_size, self.state_size, self.heads = input_size, hidden_size, heads
        self.structure = head_structure(hidden_size, heads)
        self.act = torch.tanh if nonlinearity == "tanh" else torch.relu
        k = hidden_size**-0.5
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size).uniform_(-k, k))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size).uniform_(-k, k))
        self.bias = nn.Parameter(torch.empty(hidden_size).uniform_(-k, k))
        self.register_buffer("mask", head_mask(hidden_size, heads), persistent=False)

    def prepare(self, x):
        return linear(x, self.weight_ih, self.bias)  # [B, T, H]

    def step(self, h, u):
        return self.act(u + h @ recurrent_weight(self).T)

    def step_and_jacobian(self, h, u):
        """Closed form for one head: ``J = diag(act'(a)) W_hh`` ``[N, H, H]``."""
        if self.heads != 1:
            return super().step_and_jacobian(h, u)
        f = self.act(u + h @ self.weight_hh.T)
        slope = 1 - f * f if self.act is torch.tanh else (f > 0).to(f.dtype)
        return f, slope.unsqueeze(-1) * self.weight_hh
