"""GRU with torch.nn.GRU's exact equations (dense recurrent weights, or multi-head blocks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cell import Cell
from ..linear import linear
from ._common import head_mask, head_structure, recurrent_weight


class GRU(Cell):
    """``r, z = σ(W_i x + b_i + W_h h + b_h)``, ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``,
    ``h' = (1 - z) ⊙ n + z ⊙ h``. Parameters are laid out as torch.nn.GRU's (gates r, z, n).

    ``x [B, T, input_size]`` -> state ``[B, T, hidden_size]``. ``heads > 1``: block-diagonal W_hh.

    Args:
        input_size: D_in, the size of ``x [B, T, D_in]``.
        hidden_size: H, the state ``[B, T, H]``.
        heads: block-diagonal ``W_hh`` with this many blocks (1: dense).
    """

    recurrent_parameters = {"weight_hh": "matrix"}  # see models.contractive

    def __init__(self, input_size: int, hidden_size: int, heads: int = 1):
        super().__init__()
        self.input_size, self.state_size, self.heads = input_size, hidden_size, heads
        self.structure = head_structure(hidden_size, heads)
        _torch_layout_parameters(self, input_size, hidden_size, heads, gates=3)

    @property
    def hidden_size(self) -> int:
        return self.state_size

    def prepare(self, x):
        return linear(x, self.weight_ih, self.bias_ih)  # [B, T, 3H]

    def _gates(self, h, u):
        """``r, z, n [N, H]`` and ``W_hn h + b_hn [N, H]`` at ``h [N, H]``, ``u [N, 3H]``."""
        gh = F.linear(h, recurrent_weight(self), self.bias_hh)  # [N, 3H]
        ur, uz, un = u.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r = torch.sigmoid(ur + hr)
        z = torch.sigmoid(uz + hz)
        n = torch.tanh(un + r * hn)
        return r, z, n, hn

    def step(self, h, u):
        r, z, n, _ = self._gates(h, u)
        return torch.lerp(n, h, z)  # (1 - z) n + z h

    def step_and_jacobian(self, h, u):
        """Closed form for one head (``[N, H]``, ``[N, H, H]``): O(N H²) instead of jacfwd's O(N H³).

        ``J = diag(z) + diag((h - n) z(1-z)) W_hz + diag((1-z)(1-n²)) (diag(r) W_hn + diag(g_n r(1-r)) W_hr)``
        with ``g_n = W_hn h + b_hn``. Multi-head cells use torch.func (block structure).
        """
        if self.heads != 1:
            return super().step_and_jacobian(h, u)
        r, z, n, hn = self._gates(h, u)
        Wr, Wz, Wn = self.weight_hh.chunk(3, 0)  # [H, H] each
        dn = (1 - z) * (1 - n * n)
        J = ((h - n) * z * (1 - z)).unsqueeze(-1) * Wz + (dn * r).unsqueeze(-1) * Wn \
            + (dn * hn * r * (1 - r)).unsqueeze(-1) * Wr  # [N, H, H]
        J.diagonal(dim1=-2, dim2=-1).add_(z)
        return torch.lerp(n, h, z), J

    @classmethod
    def from_torch(cls, module: nn.GRU) -> "GRU":
        """Copy a single-layer, unidirectional torch.nn.GRU (with biases)."""
        return _from_torch(cls, module, nn.GRU)

    def to_torch(self) -> nn.GRU:
        """The equivalent torch.nn.GRU (batch_first=True); needs heads == 1."""
        return _to_torch(self, nn.GRU)


def _torch_layout_parameters(cell, input_size, hidden, heads, gates):
    """torch.nn.GRU/LSTM's parameters (gate-stacked, U(-1/sqrt(H), 1/sqrt(H))) and the head mask."""
    k = hidden**-0.5
    cell.weight_ih = nn.Parameter(torch.empty(gates * hidden, input_size).uniform_(-k, k))
    cell.weight_hh = nn.Parameter(torch.empty(gates * hidden, hidden).uniform_(-k, k))
    cell.bias_ih = nn.Parameter(torch.empty(gates * hidden).uniform_(-k, k))
    cell.bias_hh = nn.Parameter(torch.empty(gates * hidden).uniform_(-k, k))
    cell.register_buffer("mask", head_mask(hidden, heads, gates), persistent=False)


def _check_torch_rnn(module, kind):
    if not isinstance(module, kind):
        raise TypeError(f"from_torch expects a torch.nn.{kind.__name__}, got {type(module).__name__}")
    if module.num_layers != 1 or module.bidirectional or not module.bias or getattr(module, "proj_size", 0):
        raise ValueError("from_torch supports single-layer, unidirectional modules with biases and no projection")


def _from_torch(cls, module, kind):
    _check_torch_rnn(module, kind)
    cell = cls(module.input_size, module.hidden_size).to(module.weight_ih_l0)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(module, name + "_l0"))
    return cell


def _to_torch(cell, kind):
    if cell.heads != 1:
        raise ValueError("to_torch needs heads == 1 (torch has no block-diagonal recurrent weights)")
    module = kind(cell.input_size, cell.hidden_size, batch_first=True).to(cell.weight_ih)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(module, name + "_l0").copy_(getattr(cell, name))
    return module

