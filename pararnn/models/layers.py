"""Layers: a residual block (norm, RNN, MLP) and a stacked sequence model, for any cell."""
from __future__ import annotations

import copy
from typing import Callable

from torch import nn

from ..cell import Cell
from ..rnn import RNN


def _cells() -> dict[str, Callable[..., Cell]]:
    from .deltanet import DeltaNet, DeltaProduct
    from .elman import Elman
    from .gru import GRU
    from .lru import LRU
    from .lstm import LSTM
    from .paragru import ParaGRU
    from .paralstm import ParaLSTM
    from .ssm import ComplexSSM, SelectiveSSM

    return {
        "elman": lambda d, **kw: Elman(d, d, **kw),
        "gru": lambda d, **kw: GRU(d, d, **kw),
        "lstm": lambda d, **kw: LSTM(d, d, **kw),
        "paragru": lambda d, **kw: ParaGRU(d, d, **kw),
        "paralstm": lambda d, **kw: ParaLSTM(d, d, **kw),
        "lru": lambda d, **kw: LRU(d, kw.pop("state_size", d), **kw),
        "ssm": lambda d, **kw: SelectiveSSM(d, kw.pop("state_size", d), "[0,1]", **kw),
        "ssm_neg": lambda d, **kw: SelectiveSSM(d, kw.pop("state_size", d), "[-1,1]", **kw),
        "cssm": lambda d, **kw: ComplexSSM(d, kw.pop("state_size", d), **kw),
        "deltanet": lambda d, **kw: DeltaNet(d, kw.pop("d_k", 8), kw.pop("d_v", d), **kw),
        "deltaproduct": lambda d, **kw: DeltaProduct(d, kw.pop("d_k", 8), kw.pop("d_v", d),
                                                     kw.pop("n_h", 2), **kw),
    }


CELLS = tuple(_cells())


def make_cell(spec: str | Cell, d_model: int, **kwargs) -> Cell:
    """A cell by name (one of ``CELLS``) with ``input_size = d_model``, or the instance as given."""
    if isinstance(spec, Cell):
        return spec
    table = _cells()
    if not isinstance(spec, str) or spec.lower() not in table:
        raise ValueError(f"unknown cell {spec!r}; choose one of {sorted(table)} or pass a pararnn.Cell")
    return table[spec.lower()](d_model, **kwargs)


class ResidualBlock(nn.Module):
    """``x + W_o RNN(LN(x))`` then ``x + MLP(LN(x))``. ``x [B, T, d_model]`` -> ``[B, T, d_model]``."""

    def __init__(self, d_model: int, cell: str | Cell = "paragru", mode: str = "parallel",
                 mlp_ratio: int = 4, solver_options: dict | None = None, **cell_kwargs):
        super().__init__()
        cell = make_cell(cell, d_model, **cell_kwargs)
        self.norm1 = nn.LayerNorm(d_model)
        self.rnn = RNN(cell, mode=mode, **(solver_options or {}))  # the cell is registered once, as rnn.cell
        self.out = nn.Linear(cell.output_size, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    @property
    def cell(self) -> Cell:
        return self.rnn.cell

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from pararnn 0.1.0 hold the cell twice (cell.* and rnn.cell.*): keep one copy.
        for key in [k for k in state_dict if k.startswith(prefix + "cell.")]:
            value = state_dict.pop(key)
            state_dict.setdefault(prefix + "rnn." + key[len(prefix):], value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, h0=None, mode=None, lengths=None, cu_seqlens=None):
        """Returns ``(x [B, T, d_model], h_T [B, state])``. ``lengths [B]``: right-padded batch
        (h_T is each sequence's state at its last valid step; outputs at padded steps are not used);
        ``cu_seqlens [N+1]``: packed ``[1, total, d_model]`` batch (h0, h_T: ``[N, state]``)."""
        y, hT = self.rnn(self.norm1(x), h0, mode=mode, lengths=lengths, cu_seqlens=cu_seqlens)
        x = x + self.out(y)
        return x + self.mlp(self.norm2(x)), hT

    def step(self, x_t, h=None):
        """One token: ``x_t [B, d_model]`` -> ``(x_t [B, d_model], h [B, state])``."""
        y, h = self.rnn.step(self.norm1(x_t), h)
        x_t = x_t + self.out(y)
        return x_t + self.mlp(self.norm2(x_t)), h


class SequenceModel(nn.Module):
    """Embedding (or a linear input map), ``n_layers`` residual blocks, a final norm and a head.

    Args:
        n_in: vocabulary size (tokens) or input features (``regression=True``).
        n_out: classes (logits) or regression targets.
        cell: a name from ``CELLS`` or a ``Cell`` (deep-copied per layer).
        regression: inputs are real features ``[B, T, n_in]`` instead of token ids ``[B, T]``.
    """

    def __init__(self, n_in: int, n_out: int, d_model: int = 64, n_layers: int = 2,
                 cell: str | Cell = "paragru", mode: str = "parallel", regression: bool = False,
                 solver_options: dict | None = None, **cell_kwargs):
        super().__init__()
        self.regression = regression
        self.embed = nn.Linear(n_in, d_model) if regression else nn.Embedding(n_in, d_model)
        self.blocks = nn.ModuleList([
            ResidualBlock(d_model, copy.deepcopy(cell) if isinstance(cell, Cell) else cell, mode=mode,
                          solver_options=solver_options, **cell_kwargs)
            for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_out)

    def _embed(self, x):
        if not self.regression and (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"token ids must be an integer tensor [B, T], got dtype {x.dtype}")
        return self.embed(x)

    def forward(self, x, states=None, mode=None, lengths=None, cu_seqlens=None):
        """``x``: token ids ``[B, T]`` (or features ``[B, T, n_in]``) -> ``(out [B, T, n_out], states)``.

        ``lengths [B]``: valid lengths of a right-padded batch; ``cu_seqlens [N+1]``: a packed
        ``[1, total]`` batch (see :class:`pararnn.RNN`)."""
        h = self._embed(x)
        new_states = []
        for i, block in enumerate(self.blocks):
            h, hT = block(h, None if states is None else states[i], mode=mode, lengths=lengths,
                          cu_seqlens=cu_seqlens)
            new_states.append(hT)
        return self.head(self.norm(h)), new_states

    def solver_stats(self) -> list[dict]:
        """Per layer: Newton steps, fallbacks and safeguard uses since the last reset (see ``RNN.stats``)."""
        return [block.rnn.stats.summary() for block in self.blocks]

    def reset_solver_stats(self) -> None:
        for block in self.blocks:
            block.rnn.stats.reset()

    def step(self, x_t, states=None):
        """One token ``[B]`` (or ``[B, n_in]``) -> ``(out [B, n_out], states)``."""
        h = self._embed(x_t)
        new_states = []
        for i, block in enumerate(self.blocks):
            h, s = block.step(h, None if states is None else states[i])
            new_states.append(s)
        return self.head(self.norm(h)), new_states
