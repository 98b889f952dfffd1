"""LSTM with torch.nn.LSTM's exact equations; the state is (h, c) packed per head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cell import Cell
from ..linear import linear
from ._common import head_structure, recurrent_weight
from .gru import _from_torch, _to_torch, _torch_layout_parameters


class LSTM(Cell):
    """``i, f, g, o`` from ``W_ih x + b_ih + W_hh h + b_hh``; ``c' = f c + i g``, ``h' = o tanh(c')``.

    The state is ``[B, 2H]``: for each of ``heads`` heads, that head's h then its c (with one head,
    ``[h, c]``), so a multi-head LSTM has a ``Block(2H/heads)`` Jacobian. Use :meth:`split_state`
    / :meth:`join_state` to convert; ``RNN`` outputs ``y = h [B, T, H]``.

    Args:
        input_size: D_in, the size of ``x [B, T, D_in]``.
        hidden_size: H; the state is ``[B, 2H]`` (h and c), the output ``h [B, T, H]``.
        heads: block-diagonal ``W_hh`` with this many blocks (1: dense).
    """

    recurrent_parameters = {"weight_hh": "matrix"}  # see models.contractive

    def __init__(self, input_size: int, hidden_size: int, heads: int = 1):
        super().__init__()
        self.input_size, self.hidden_size, self.heads = input_size, hidden_size, heads
        self.state_size = 2 * hidden_size
        self.structure = head_structure(hidden_size, heads, parts=2)
        _torch_layout_parameters(self, input_size, hidden_size, heads, gates=4)

    def split_state(self, s: torch.Tensor):
        """``s [..., 2H]`` -> ``(h [..., H], c [..., H])``."""
        parts = s.reshape(*s.shape[:-1], self.heads, 2, self.hidden_size // self.heads)
        return parts[..., 0, :].flatten(-2), parts[..., 1, :].flatten(-2)

    def join_state(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``(h [..., H], c [..., H])`` -> ``s [..., 2H]``."""
        hd = self.hidden_size // self.heads
        hh = h.reshape(*h.shape[:-1], self.heads, 1, hd)
        cc = c.reshape(*c.shape[:-1], self.heads, 1, hd)
        return torch.cat([hh, cc], -2).flatten(-3)

    def prepare(self, x):
        return linear(x, self.weight_ih, self.bias_ih)  # [B, T, 4H]

    def _gates(self, s, u):
        """``h, c [N, H]`` from the state ``s [N, 2H]`` and the activated gates ``i, f, g, o [N, H]``."""
        h, c = self.split_state(s)
        g_all = u + F.linear(h, recurrent_weight(self), self.bias_hh)  # [N, 4H]
        ai, af, ag, ao = g_all.chunk(4, -1)
        return h, c, torch.sigmoid(ai), torch.sigmoid(af), torch.tanh(ag), torch.sigmoid(ao)

    def step(self, s, u):
        h, c, i, f, g, o = self._gates(s, u)
        c = f * c + i * g
        return self.join_state(o * torch.tanh(c), c)

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def step_and_jacobian(self, s, u):
        """Closed form for one head: ``J = [[dh'/dh, dh'/dc], [dc'/dh, dc'/dc]]`` ``[N, 2H, 2H]``.

        O(N H²) instead of jacfwd's O(N H³); multi-head cells use torch.func (block structure).
        """
        if self.heads != 1:
            return super().step_and_jacobian(s, u)
        h, c, i, f, g, o = self._gates(s, u)
        c2 = f * c + i * g
        tc = torch.tanh(c2)
        h2 = o * tc
        Wi, Wf, Wg, Wo = self.weight_hh.chunk(4, 0)  # [H, H] each
        dc_dh = (c * f * (1 - f)).unsqueeze(-1) * Wf + (g * i * (1 - i)).unsqueeze(-1) * Wi \
            + (i * (1 - g * g)).unsqueeze(-1) * Wg  # [N, H, H]
        do = o * (1 - tc * tc)
        dh_dh = (tc * o * (1 - o)).unsqueeze(-1) * Wo + do.unsqueeze(-1) * dc_dh
        top = torch.cat([dh_dh, torch.diag_embed(do * f)], -1)  # [N, H, 2H]
        bottom = torch.cat([dc_dh, torch.diag_embed(f)], -1)
        return self.join_state(h2, c2), torch.cat([top, bottom], -2)

    def output(self, s, x):
        return self.split_state(s)[0]  # [B, T, H]

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> "LSTM":
        """Copy a single-layer, unidirectional torch.nn.LSTM (with biases, no projection)."""
        return _from_torch(cls, module, nn.LSTM)

    def to_torch(self) -> nn.LSTM:
        """The equivalent torch.nn.LSTM (batch_first=True); needs heads == 1."""
        return _to_torch(self, nn.LSTM)
