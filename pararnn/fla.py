"""A token-mixing layer with flash-linear-attention's layer convention (no fla needed to use it).

:class:`RNNAttention` takes the place of an fla layer such as ``HGRNAttention`` or
``GatedLinearAttention`` in a block: ``forward(hidden_states, attention_mask, past_key_values,
use_cache, output_attentions, **kwargs)`` returns ``(o, None, past_key_values)``, the recurrent
state lives in fla's cache under the layer's ``layer_idx`` (``past_key_values[layer_idx]
["recurrent_state"]``, written with ``past_key_values.update(recurrent_state=..., layer_idx=...,
offset=T)``), ``attention_mask [B, T]`` marks padding (left-padded prompts included) and
``cu_seqlens`` (a keyword) packs sequences ``[1, total, hidden_size]``. Any object with that
cache interface serves (fla's ``Cache``, or a stand-in with ``len``, ``[layer_idx]`` and ``update``)::

    from fla.models.utils import Cache
    layer = pararnn.fla.RNNAttention(hidden_size=256, cell="paragru", layer_idx=0)
    cache = Cache()
    o, _, cache = layer(x, past_key_values=cache, use_cache=True)        # prefill, x [B, T, 256]
    o_t, _, cache = layer(x_t, past_key_values=cache, use_cache=True)    # one token, x_t [B, 1, 256]
"""
from __future__ import annotations

import torch
from torch import nn

from .cell import Cell
from .inputs import padding_from_mask, rotate
from .models.layers import make_cell
from .rnn import RNN


class RNNAttention(nn.Module):
    """A pararnn RNN as an fla token mixer: ``o = W_o RNN(x)``, the RNN solved in parallel.

    Args:
        hidden_size: the width of ``hidden_states [B, T, hidden_size]``.
        cell: a name from ``pararnn.models.CELLS`` (built with input size ``hidden_size``) or a
            :class:`pararnn.Cell` whose input size is ``hidden_size``.
        mode: the :class:`pararnn.RNN`'s mode (``"parallel"``, ``"sequential"`` or ``"auto"``).
        layer_idx: this layer's index in fla's cache (needed with ``past_key_values``).
        solver_options: :class:`pararnn.SolverOptions` fields for the RNN.
        **cell_kwargs: the named cell's constructor arguments (e.g. ``state_size`` for ``"lru"``).

    Shapes:
        hidden_states ``[B, T, hidden_size]`` (with ``cu_seqlens [N+1]``: ``[1, total,
        hidden_size]``); output the same; the cached ``recurrent_state`` ``[B, state]`` (``[N,
        state]`` packed).

    Example::

        layer = RNNAttention(hidden_size=64, cell="paragru", layer_idx=0)
        o, _, _ = layer(torch.randn(2, 100, 64))   # o [2, 100, 64]
    """

    def __init__(self, hidden_size: int = 1024, cell: str | Cell = "paragru", mode: str = "parallel",
                 layer_idx: int | None = None, solver_options: dict | None = None, **cell_kwargs):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an int >= 1, got {hidden_size!r}")
        if layer_idx is not None and (isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0):
            raise ValueError(f"layer_idx must be an int >= 0 or None, got {layer_idx!r}")
        self.hidden_size, self.layer_idx = hidden_size, layer_idx
        self.rnn = RNN(make_cell(cell, hidden_size, **cell_kwargs), mode=mode, **(solver_options or {}))
        self.o_proj = nn.Linear(self.rnn.cell.output_size, hidden_size, bias=False)

    @property
    def cell(self) -> Cell:
        """The layer's cell (``self.rnn.cell``)."""
        return self.rnn.cell

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool | None = False, output_attentions: bool | None = False,
                **kwargs):
        """Mix the tokens: a parallel solve over the sequence, or one step per token when
        continuing from a cached state with one new token.

        Args:
            hidden_states: ``[B, T, hidden_size]``.
            attention_mask: ``[B, T']`` 0/1, ``T' >= T`` (generation passes the whole history; the
                last T columns are this call's): 0 marks padding, at the start (a left-padded prompt)
                or at the end of each row. Padded steps hold the state and output zero.
            past_key_values: fla's cache (or None): the state to continue from, and where the
                final state goes.
            use_cache: write the final state into ``past_key_values``.
            output_attentions: accepted for fla's convention (there are no attention weights: None).
            **kwargs: ``cu_seqlens [N+1]`` (packed sequences, ``B = 1``); other keywords fla's blocks
                pass (``lower_bound``, ...) are ignored.

        Returns:
            ``(o [B, T, hidden_size], None, past_key_values)``.
        """
        x = hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must be [B, T, hidden_size = {self.hidden_size}], got "
                             f"{list(getattr(x, 'shape', [type(x).__name__]))}")
        B, T = x.shape[:2]
        cu_seqlens = kwargs.get("cu_seqlens")
        mask = self._mask(attention_mask, B, T, cu_seqlens)
        h0 = self._cached_state(past_key_values)
        if h0 is not None and T == 1 and cu_seqlens is None:  # one token of a decode
            y, h = self.rnn.step(x[:, 0], h0, None if mask is None else mask[:, 0])
            y = y[:, None]
        elif cu_seqlens is not None:
            y, h = self.rnn(x, h0, cu_seqlens=cu_seqlens)
        else:
            lengths, shift = padding_from_mask(mask, continuing=h0 is not None)
            y, h = self.rnn(x if shift is None else rotate(x, shift), h0, lengths=lengths)
            y = y if shift is None else rotate(y, -shift)  # left padding: back in place, zeros first
        if past_key_values is not None:  # as fla's layers: the token count always, the state with use_cache
            past_key_values.update(recurrent_state=h if use_cache else None, layer_idx=self.layer_idx, offset=T)
        return self.o_proj(y), None, past_key_values

    def _mask(self, attention_mask, B: int, T: int, cu_seqlens) -> torch.Tensor | None:
        """This call's ``[B, T]`` bool mask (the last T columns), checked; None without one."""
        if attention_mask is None:
            return None
        if cu_seqlens is not None:
            raise ValueError("pass attention_mask or cu_seqlens, not both")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
            raise ValueError(f"attention_mask must be a 0/1 padding mask [B = {B}, T' >= {T}] (fla's convention; "
                             f"no [B, T, T] masks), got {list(getattr(attention_mask, 'shape', []))}")
        return attention_mask[:, -T:].bool()

    def _cached_state(self, past_key_values) -> torch.Tensor | None:
        """This layer's ``recurrent_state`` in fla's cache, or None (no cache, or nothing cached yet)."""
        if past_key_values is None:
            return None
        if self.layer_idx is None:
            raise ValueError("RNNAttention needs layer_idx (its index in the cache) to use past_key_values")
        if len(past_key_values) <= self.layer_idx:
            return None
        return past_key_values[self.layer_idx]["recurrent_state"]

    def state_size(self, **kwargs) -> int:
        """The size of the recurrent state per sequence (fla layers report theirs so)."""
        return self.rnn.cell.state_size


__all__ = ["RNNAttention"]
