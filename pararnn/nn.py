"""`pararnn.nn`: drop-in GRU, LSTM and RNN with torch.nn's constructor, shapes and parameter names.

``pararnn.nn.GRU(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional)``
has torch.nn.GRU's forward (``input [T, B, H_in]`` or batch first, ``hx [num_layers·dirs, B, H]``,
``PackedSequence`` in and out, unbatched ``[T, H_in]``) and its parameters (``weight_ih_l0``,
``bias_hh_l1_reverse``, ...), so ``load_state_dict`` works both ways. Each layer and direction is
solved by a :class:`pararnn.RNN` (``mode="auto"`` by default: parallel Newton where it is measured
to win on this device, the sequential loop otherwise); the reverse direction is the same solve on
each sequence reversed within its length.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import models
from .linear import linear
from .rnn import RNN as _Solver
from .utils.rng import untouched_rng

_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class _Bound:
    """Mixin for a zoo cell that owns no parameters: ``weight_ih`` and friends are read, at every
    access, from the owning module's torch-named attribute (``weight_ih_l1_reverse``), so the
    owner's ``load_state_dict``, ``.to()``, ``deepcopy`` and parametrizations (weight norm, ...)
    are what the solver sees. Missing biases (``bias=False``) read as None."""

    def _bind(self, owner: nn.Module, suffix: str) -> None:
        self._parameters.clear()  # the cell's own (discarded) initial weights: the owner holds them
        self.__dict__["_owner"], self.__dict__["_suffix"] = owner, suffix

    def __getattr__(self, name):
        if name in _WEIGHTS and "_owner" in self.__dict__:
            return getattr(self.__dict__["_owner"], name + self.__dict__["_suffix"], None)
        return super().__getattr__(name)

    def parameters(self, recurse: bool = True):
        """The owner's parameters (dtype, device and requires_grad checks of :class:`pararnn.RNN`)."""
        return self.__dict__["_owner"].parameters(recurse)


class _GRUCell(_Bound, models.GRU):
    pass


class _LSTMCell(_Bound, models.LSTM):
    pass


class _ElmanCell(_Bound, models.Elman):
    def prepare(self, x):
        u = linear(x, self.weight_ih, self.bias_ih)  # [B, T, H]
        return u if self.bias_hh is None else u + self.bias_hh  # torch.nn.RNN's two biases, folded


_SOLVER_MODES = ("auto", "parallel", "sequential")


class _RNNBase:
    """pararnn's solve behind a :class:`torch.nn.RNNBase` subclass (mixed in before it): torch's
    constructor makes the parameters, attributes, ``mode`` and argument checks; this adds one
    :class:`pararnn.RNN` per layer and direction, bound to those parameters, and replaces the
    forward. Subclasses set ``_cell`` (or override ``_make_cell``)."""

    _cell = None

    def _init_solvers(self, solver_mode: str, solver_options: dict) -> None:
        if solver_mode not in _SOLVER_MODES:
            raise ValueError(f"solver_mode must be one of {_SOLVER_MODES}, got {solver_mode!r}")
        if not isinstance(self.bidirectional, bool):  # torch's own forward refuses it too, later
            raise TypeError(f"bidirectional should be of type bool, got: {type(self.bidirectional).__name__}")
        self.solver_mode = solver_mode
        dirs = 2 if self.bidirectional else 1
        rnns = []
        for layer in range(self.num_layers):
            layer_in = self.input_size if layer == 0 else self.hidden_size * dirs
            for direction in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                with untouched_rng(torch.device("cpu")):  # the cell's own (discarded) init, made on the
                    cell = self._make_cell(layer_in, self.hidden_size)  # CPU, must not shift the RNG: torch.nn's seeds give torch.nn's weights
                cell._bind(self, sfx)
                rnns.append(_Solver(cell, mode=solver_mode, **solver_options))
        self.__dict__["_rnns"] = rnns  # not submodules: the parameters live here, under torch's names

    @staticmethod
    def _split_options(args: tuple, kwargs: dict) -> tuple[str, dict]:
        """``(solver_mode, solver options)`` taken out of the constructor's keyword arguments (the
        rest are torch.nn's). ``mode=`` with a solver mode is the old name of ``solver_mode``."""
        import dataclasses

        from .solver.options import SolverOptions

        for i, name in enumerate(("input_size", "hidden_size", "num_layers")):  # torch's TypeError, named
            value = kwargs.get(name, args[i] if i < len(args) else 1)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(SolverOptions)}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
        solver_mode = kwargs.pop("solver_mode", "auto")
        if kwargs.get("mode") in _SOLVER_MODES:
            solver_mode = kwargs.pop("mode")
        return solver_mode, options

    def _make_cell(self, input_size: int, hidden_size: int):
        return self._cell(input_size, hidden_size)

    @property
    def rnns(self) -> tuple:
        """The :class:`pararnn.RNN` of each layer and direction (order: l0, l0_reverse, l1, ...):
        their ``last_info``, ``stats`` and ``register_solve_hook`` report each solve."""
        return tuple(self._rnns)

    def _load_from_state_dict(self, *args, **kwargs):
        for rnn in self._rnns:  # the cells read these weights: their probes' facts are stale
            rnn.cell.__dict__.pop("_pararnn_facts", None)
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", solver_mode={self.solver_mode!r}"

    def __prepare_scriptable__(self):
        raise RuntimeError(f"pararnn.nn.{type(self).__name__} cannot be scripted (torch.jit.script): its solve runs "
                           "numba/Triton scans and a Newton loop outside TorchScript. Use torch.compile, or "
                           "torch.nn." + type(self).__name__ + " with the same state_dict for TorchScript.")

    # ------------------------------------------------------------------ state layout
    def _state_from_hx(self, hx) -> torch.Tensor | None:
        """``hx [L·D, B, H]`` (checked by :meth:`_check_args`) -> states ``[L·D, B, state]`` (None: zeros)."""
        return hx

    def _hx_from_state(self, hn: torch.Tensor):
        return hn

    # ------------------------------------------------------------------ forward
    def _check_args(self, input, hx):
        """torch.nn's argument checks, with its exception types and in its order: the input's and
        hx's dimensions, torch's own ``check_input`` (input size, dtype), then hx's shape and dtype,
        with messages that name h0/c0/hx (torch's kernel raises a RuntimeError for the dtype).
        Returns hx with a batch dim (``[L·D, 1, H]`` for an unbatched input; LSTM: a tuple), or None."""
        name = next(c.__name__ for c in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(self, c))
        lstm = isinstance(self, nn.LSTM)
        if lstm and hx is not None and (not isinstance(hx, tuple) or len(hx) != 2):
            raise TypeError("hx must be a tuple (h0, c0) for an LSTM")
        hs = None if hx is None else (hx if lstm else (hx,))
        if hs is not None and not all(isinstance(h, torch.Tensor) for h in hs):
            raise TypeError(f"hx must be a torch.Tensor (LSTM: a tuple of two), got {type(hx).__name__}")
        if isinstance(input, PackedSequence):
            x, batch_sizes = input.data, input.batch_sizes
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input must be a torch.Tensor or a PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched, batch_sizes = input.dim() == 3, None
            if hs is not None and any(h.dim() != (3 if batched else 2) for h in hs):
                which = "hx and cx" if lstm else "hx"
                got = ", ".join(f"{h.dim()}-D" for h in hs)
                raise RuntimeError(f"For {'batched 3' if batched else 'unbatched 2'}-D input, {which} should also "
                                   f"be {3 if batched else 2}-D but got ({got}) tensor{'s' if lstm else ''}")
            x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            hs = hs if hs is None or batched else tuple(h.unsqueeze(1) for h in hs)
        getattr(self, "_update_flat_weights", lambda: None)()  # torch's check reads its weight list
        self.check_input(x, batch_sizes)  # torch's: input size (RuntimeError) and dtype (ValueError)
        if hs is None:
            return None
        want = tuple(self.get_expected_hidden_size(x, batch_sizes))  # (L·D, B, H), as torch's check
        autocast = torch.is_autocast_enabled(x.device.type)
        for h, arg in zip(hs, ("h0", "c0") if lstm else ("hx",), strict=True):
            if tuple(h.shape) != want:  # torch's RuntimeError, naming the argument
                raise RuntimeError(f"Expected hidden size {want}, got {list(h.shape)}: {arg} must be "
                                   "[num_layers*num_directions, batch, hidden_size]")
            if h.dtype != x.dtype and not autocast:  # torch's kernel raises a RuntimeError
                raise RuntimeError(f"{arg} dtype ({h.dtype}) does not match input dtype ({x.dtype}): "
                                   f"convert it ({arg}.to({x.dtype}))")
        return hs if lstm else hs[0]

    def _forward_torch(self, input, hx):
        """torch.nn's own forward (the torch.nn class after this mixin), with these parameters."""
        return super().forward(input, hx)

    def forward(self, input, hx=None):
        """``input``: ``[T, B, H_in]`` (``[B, T, H_in]`` if batch_first), ``[T, H_in]`` unbatched,
        or a ``PackedSequence``. ``hx``: ``[num_layers·dirs, B, H]`` (LSTM: a tuple ``(h0, c0)``).

        Returns ``(output, h_n)``: output ``[T, B, dirs·H]`` (or batch first, or packed like the
        input; zero at padded positions), ``h_n`` like ``hx`` (LSTM: ``(h_n, c_n)``), each
        sequence's state at its own last step.
        """
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError(f"pararnn.nn.{type(self).__name__} cannot be traced by torch.jit.trace or "
                               "torch.export: its solve reads values (Newton's convergence tests) and runs numba/Triton "
                               "scans. Use torch.compile (the solve runs eagerly inside it), or export torch.nn."
                               f"{type(self).__name__} with the same state_dict.")
        with parametrize.cached():  # parametrized weights: computed once, in the caller's grad mode
            for name in getattr(self, "parametrizations", {}):
                getattr(self, name)
            outputs = self._forward(input, hx)  # under autocast: the projections in its dtype, the state not
            dtype = self._autocast_output_dtype(input)
            return outputs if dtype is None else _cast_outputs(outputs, dtype)

    def _autocast_output_dtype(self, input) -> torch.dtype | None:
        """Under autocast, the dtype torch.nn's module returns for ``input`` (a tensor or a
        PackedSequence, already checked); None without autocast.

        Autocast's policy for torch's RNN ops differs by op, device, input kind and torch version
        (CPU, torch 2.13: LSTM and RNN return the lower precision, GRU its input's dtype, and LSTM
        given a PackedSequence whose lengths differ returns float32), so it is read off torch.nn's
        own forward on a probe of the same kind (``kind``: None for a tensor, else whether the
        PackedSequence's lengths differ) of one or two steps, once per class, device type, autocast
        dtype, kind, and input and weight dtypes."""
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return None
        kind = bool((input.batch_sizes != input.batch_sizes[0]).any()) if packed else None
        key = (type(self), device, torch.get_autocast_dtype(device), kind, x.dtype, self.weight_ih_l0.dtype)
        if key not in _AUTOCAST_DTYPES:
            _AUTOCAST_DTYPES[key] = self._torch_output_dtype(x, kind)
        return _AUTOCAST_DTYPES[key]

    @torch.compiler.disable
    def _torch_output_dtype(self, x: torch.Tensor, kind: bool | None) -> torch.dtype:
        steps = x.new_zeros(2, 2, self.input_size)  # [B = 2, T = 2, H_in]
        if kind is None:
            probe = steps[0]  # unbatched [T = 2, H_in]
        else:  # lengths (2, 1) where the input's differ, else (2, 2)
            probe = pack_padded_sequence(steps, torch.tensor([2, 1 if kind else 2]), batch_first=True)
        with torch.no_grad(), untouched_rng(x.device):  # (torch's dropout between layers draws)
            out, _ = self._forward_torch(probe, None)
        return (out if kind is None else out.data).dtype

    def _forward(self, input, hx):
        if isinstance(hx, list):
            hx = tuple(hx)
        hx = self._check_args(input, hx)  # with a batch dim
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=True)  # [B, T, H_in], original order
            lengths = lengths.to(x.device)
        else:
            unbatched = input.dim() == 2
            x = input.unsqueeze(0) if unbatched else (input if self.batch_first else input.transpose(0, 1))
            lengths = None
        B = x.shape[0]
        if x.shape[1] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")  # torch's words
        if B == 0:  # torch.nn's own forward: empty outputs, connected to the weights as torch's are
            return self._forward_torch(input, hx)
        states = self._state_from_hx(hx)  # [L·D, B, state] or None
        dirs = 2 if self.bidirectional else 1
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for direction in range(dirs):
                i = layer * dirs + direction
                h0 = None if states is None else states[i]
                xi = x if direction == 0 else _reverse_within(x, lengths)
                y, hT = self._rnns[i](xi, h0, lengths=lengths)
                outs.append(y if direction == 0 else _reverse_within(y, lengths))
                finals.append(hT)
            x = outs[0] if dirs == 1 else torch.cat(outs, -1)  # [B, T, dirs·H]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        hn = self._hx_from_state(torch.stack(finals))  # [L·D, B, H] (LSTM: a tuple)
        if packed:
            order = input.sorted_indices  # pack in the input's own order, so batch_sizes line up
            ys, ls = (x, lengths) if order is None else (x.index_select(0, order), lengths[order.to(x.device)])
            data = pack_padded_sequence(ys, ls.cpu(), batch_first=True).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), hn
        if unbatched:
            return x[0], (tuple(h[:, 0] for h in hn) if isinstance(hn, tuple) else hn[:, 0])
        # torch's layout (contiguous [T, B, H] when time-major): a later dropout draws its mask in
        # memory order, so the same seed gives the same mask as after torch.nn's module
        return (x if self.batch_first else x.transpose(0, 1).contiguous()), hn


_AUTOCAST_DTYPES: dict[tuple, torch.dtype] = {}  # see _RNNBase._autocast_output_dtype


def _cast_outputs(outputs, dtype: torch.dtype):
    """``(output, h_n)`` (a PackedSequence output, an LSTM's ``(h_n, c_n)``) cast to ``dtype``."""
    out, hn = outputs
    out = out._replace(data=out.data.to(dtype)) if isinstance(out, PackedSequence) else out.to(dtype)
    hn = tuple(h.to(dtype) for h in hn) if isinstance(hn, tuple) else hn.to(dtype)
    return out, hn


def _reverse_within(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse each sequence of ``x [B, T, F]`` within its own length (padding stays in place)."""
    if lengths is None:
        return x.flip(1)
    T = x.shape[1]
    t = torch.arange(T, device=x.device)
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # [B, T]
    return x.gather(1, idx[..., None].expand_as(x))


class GRU(_RNNBase, nn.GRU):
    """:class:`torch.nn.GRU` (a subclass: same constructor, checks, parameters, attributes and
    ``mode``), its forward solved by pararnn. Extra keyword arguments: ``solver_mode``
    (``"auto"``, ``"parallel"``, ``"sequential"``; ``mode=`` with one of these is accepted too) and
    :class:`pararnn.SolverOptions` fields.

    Args:
        *args: torch.nn's positional arguments (``input_size``, ``hidden_size``, ``num_layers``, ...).
        **kwargs: torch.nn's keyword arguments (``batch_first``, ``bidirectional``, ``dropout``,
            ``device``, ``dtype``, ...); ``solver_mode``: ``"auto"`` (default), ``"parallel"``
            or ``"sequential"``; and :class:`pararnn.SolverOptions` fields (e.g. ``chunk_size``).

    Shapes (as torch.nn's):
        input ``[T, B, H_in]`` (``[B, T, H_in]`` with ``batch_first``, ``[T, H_in]`` unbatched, or a
        PackedSequence); output ``[T, B, D·H]``; h_n ``[D·num_layers, B, H]`` (D = 2 if
        bidirectional, else 1).

    Example::

        rnn = pararnn.nn.GRU(16, 32, num_layers=2, batch_first=True)   # was torch.nn.GRU(...)
        y, h_n = rnn(torch.randn(4, 1000, 16))                         # y [4, 1000, 32], h_n [2, 4, 32]
    """

    _cell = _GRUCell

    def __init__(self, *args, **kwargs):
        solver_mode, options = self._split_options(args, kwargs)
        nn.GRU.__init__(self, *args, **kwargs)
        self._init_solvers(solver_mode, options)


class RNN(_RNNBase, nn.RNN):
    """:class:`torch.nn.RNN` (``nonlinearity="tanh"`` or ``"relu"``), its forward solved by pararnn.

    Args:
        *args: torch.nn's positional arguments (``input_size``, ``hidden_size``, ``num_layers``, ...).
        **kwargs: torch.nn's keyword arguments (``batch_first``, ``bidirectional``, ``dropout``,
            ``device``, ``dtype``, ``nonlinearity``, ...); ``solver_mode``: ``"auto"`` (default), ``"parallel"``
            or ``"sequential"``; and :class:`pararnn.SolverOptions` fields (e.g. ``chunk_size``).

    Shapes (as torch.nn's):
        input ``[T, B, H_in]`` (``[B, T, H_in]`` with ``batch_first``, ``[T, H_in]`` unbatched, or a
        PackedSequence); output ``[T, B, D·H]``; h_n ``[D·num_layers, B, H]`` (D = 2 if
        bidirectional, else 1).
    """

    def __init__(self, *args, **kwargs):
        solver_mode, options = self._split_options(args, kwargs)
        nn.RNN.__init__(self, *args, **kwargs)
        self._init_solvers(solver_mode, options)

    def _make_cell(self, input_size, hidden_size):
        return _ElmanCell(input_size, hidden_size, nonlinearity=self.nonlinearity)


class LSTM(_RNNBase, nn.LSTM):
    """:class:`torch.nn.LSTM` (``hx = (h0, c0)``, returns ``(output, (h_n, c_n))``), its forward
    solved by pararnn. ``proj_size`` raises NotImplementedError.

    Args:
        *args: torch.nn's positional arguments (``input_size``, ``hidden_size``, ``num_layers``, ...).
        **kwargs: torch.nn's keyword arguments (``batch_first``, ``bidirectional``, ``dropout``,
            ``device``, ``dtype``, ...); ``solver_mode``: ``"auto"`` (default), ``"parallel"``
            or ``"sequential"``; and :class:`pararnn.SolverOptions` fields (e.g. ``chunk_size``).

    Shapes (as torch.nn's):
        input ``[T, B, H_in]`` (``[B, T, H_in]`` with ``batch_first``, ``[T, H_in]`` unbatched, or a
        PackedSequence); output ``[T, B, D·H]``; h_n ``[D·num_layers, B, H]`` (D = 2 if
        bidirectional, else 1).
        c_n as h_n.
    """

    _cell = _LSTMCell

    def __init__(self, *args, **kwargs):
        solver_mode, options = self._split_options(args, kwargs)
        if kwargs.get("proj_size", 0) or (len(args) > 7 and args[7]):
            raise NotImplementedError("proj_size is not supported by pararnn.nn.LSTM (use proj_size=0)")
        nn.LSTM.__init__(self, *args, **kwargs)
        self._init_solvers(solver_mode, options)

    def _state_from_hx(self, hx):
        return None if hx is None else torch.cat(hx, -1)  # [L·D, B, 2H]: one head, state = [h, c]

    def _hx_from_state(self, hn):  # copies, not views of one tensor: h_n.detach_() works, as in torch.nn
        return hn[..., :self.hidden_size].clone(), hn[..., self.hidden_size:].clone()


def safe_globals() -> list:
    """What ``torch.load(..., weights_only=True)`` must allow to load a whole pickled module that
    holds pararnn.nn layers (``torch.save(model)``)::

        with torch.serialization.safe_globals(pararnn.nn.safe_globals()):
            model = torch.load(path, weights_only=True)

    Returns:
        The classes and functions to pass to ``torch.serialization.safe_globals``.
    """
    import collections

    from . import cell, structure
    from .solver import options

    return [GRU, LSTM, RNN, _GRUCell, _LSTMCell, _ElmanCell, _Solver, options.SolverOptions, options.SolverInfo,
            options.SolveStats,
            structure.Diagonal, structure.Dense, structure.Block, cell.Cell, collections.OrderedDict, set,
            torch.nn.modules.container.ModuleList, torch.nn.modules.linear.Identity]


__all__ = ["GRU", "LSTM", "RNN", "safe_globals"]
