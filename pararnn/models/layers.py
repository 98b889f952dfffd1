"""Layers: a residual block (norm, RNN, MLP) and a stacked sequence model, for any cell."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from typing import Callable

import torch
from torch import nn

from ..cell import Cell
from ..rnn import MODES, RNN


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
    """A cell by name with ``input_size = d_model``, or the instance as given.

    Args:
        spec: a name from ``CELLS`` (``"paragru"``, ``"lstm"``, ``"deltanet"``, ...) or a Cell.
        d_model: the input size (and the state size, for cells whose state follows it).
        **kwargs: the cell's constructor arguments (e.g. ``heads``).

    Returns:
        The :class:`pararnn.Cell`.

    Raises:
        ValueError: an unknown name; an instance whose ``input_size`` is not ``d_model``, or one
            given with constructor arguments (they apply to a named cell only).
    """
    if isinstance(spec, Cell):
        if kwargs:
            raise ValueError(f"cell keyword arguments {sorted(kwargs)} apply to a cell given by name, not to the "
                             f"instance {type(spec).__name__} (construct it with them instead)")
        if spec.input_size is not None and spec.input_size != d_model:
            raise ValueError(f"the cell's input_size ({spec.input_size}) must be the layer's width ({d_model}): "
                             f"the layer feeds it [B, T, {d_model}]")
        return spec
    table = _cells()
    if not isinstance(spec, str) or spec.lower() not in table:
        raise ValueError(f"unknown cell {spec!r}; choose one of {sorted(table)} or pass a pararnn.Cell")
    return table[spec.lower()](d_model, **kwargs)


class ResidualBlock(nn.Module):
    """``x + W_o RNN(LN(x))`` then ``x + MLP(LN(x))``. ``x [B, T, d_model]`` -> ``[B, T, d_model]``.

    Args:
        d_model: the width of ``x [B, T, d_model]``.
        cell: a name from ``CELLS`` or a :class:`pararnn.Cell` (its input size must be d_model).
        mode: the :class:`pararnn.RNN`'s mode.
        mlp_ratio: the MLP's hidden width, in multiples of d_model.
        solver_options: :class:`pararnn.SolverOptions` fields for the RNN.
        **cell_kwargs: the named cell's constructor arguments (e.g. ``heads``).
    """

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
        """The block's cell (``self.rnn.cell``)."""
        return self.rnn.cell

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from pararnn 0.1.0 hold the cell twice (cell.* and rnn.cell.*): keep one copy.
        for key in [k for k in state_dict if k.startswith(prefix + "cell.")]:
            value = state_dict.pop(key)
            state_dict.setdefault(prefix + "rnn." + key[len(prefix):], value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, h0=None, mode=None, lengths=None, cu_seqlens=None):
        """The block over whole sequences.

        Args:
            x: ``[B, T, d_model]``.
            h0: ``[B, state]`` (None: zeros).
            mode: the solve's mode (None: the block's).
            lengths: ``[B]``, a right-padded batch (h_T is each sequence's state at its last valid
                step; outputs at padded steps are not used).
            cu_seqlens: ``[N+1]``, a packed ``[1, total, d_model]`` batch (h0, h_T: ``[N, state]``).

        Returns:
            ``(x [B, T, d_model], h_T [B, state])``.
        """
        y, hT = self.rnn(self.norm1(x), h0, mode=mode, lengths=lengths, cu_seqlens=cu_seqlens)
        x = x + self.out(y)
        return x + self.mlp(self.norm2(x)), hT

    def step(self, x_t, h=None, mask=None):
        """One token through the block.

        Args:
            x_t: ``[B, d_model]``.
            h: ``[B, state]`` (None: zeros).
            mask: ``[B]`` bool: False holds that sequence's state (see :meth:`pararnn.RNN.step`).

        Returns:
            ``(x_t [B, d_model], h [B, state])``.
        """
        y, h = self.rnn.step(self.norm1(x_t), h, mask)
        x_t = x_t + self.out(y)
        return x_t + self.mlp(self.norm2(x_t)), h


@dataclasses.dataclass
class SequenceModelConfig:
    """Everything :class:`SequenceModel` is built from; saved as ``config.json`` by
    :meth:`SequenceModel.save_pretrained`.

    ``cell`` is a name from ``CELLS`` (a Cell instance can build a model but not be saved);
    ``cell_kwargs`` go to that cell's constructor (e.g. ``{"heads": 4}``), ``solver_options`` to
    each layer's :class:`pararnn.RNN` (JSON values only: no process group, no ``init`` tensor).

    Attributes:
        n_in: vocabulary size, or input features with ``regression``.
        n_out: classes, or regression targets.
        d_model: the model width.
        n_layers: residual blocks.
        cell: the cell's name.
        mode: each layer's :class:`pararnn.RNN` mode.
        regression: real-valued inputs and outputs instead of tokens and logits.
        mlp_ratio: the blocks' MLP width, in multiples of d_model.
        solver_options: :class:`pararnn.SolverOptions` fields for every layer.
        cell_kwargs: the cell's constructor arguments.
    """

    n_in: int
    n_out: int
    d_model: int = 64
    n_layers: int = 2
    cell: str = "paragru"
    mode: str = "parallel"
    regression: bool = False
    mlp_ratio: int = 4
    solver_options: dict = dataclasses.field(default_factory=dict)
    cell_kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        """Each field's type and range, named (a hand-edited config.json fails here, not deep in torch)."""
        for name in ("n_in", "n_out", "d_model", "n_layers", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"config field {name} must be an int, got {value!r} ({type(value).__name__})")
            if value < 1:
                raise ValueError(f"config field {name} must be >= 1, got {value}")
        if not isinstance(self.cell, (str, Cell)):
            raise TypeError(f"config field cell must be a name from pararnn.models.CELLS or a Cell, got {self.cell!r}")
        if isinstance(self.cell, str) and self.cell.lower() not in CELLS:
            raise ValueError(f"config field cell must be one of {list(CELLS)}, got {self.cell!r}")
        if self.mode not in MODES:
            raise ValueError(f"config field mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.regression, bool):
            raise TypeError(f"config field regression must be a bool, got {self.regression!r}")
        for name in ("solver_options", "cell_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"config field {name} must be a dict, got {getattr(self, name)!r}")


CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE = "config.json", "model.safetensors", "model.pt"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: str, write) -> None:
    """``write(tmp)`` then an atomic rename onto ``path``; the temporary file is removed on failure."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class SequenceModel(nn.Module):
    """Embedding (or a linear input map), ``n_layers`` residual blocks, a final norm and a head.

    Args:
        n_in: vocabulary size (tokens) or input features (``regression=True``).
        n_out: classes (logits) or regression targets.
        cell: a name from ``CELLS`` or a ``Cell`` (deep-copied per layer).
        regression: inputs are real features ``[B, T, n_in]`` instead of token ids ``[B, T]``.

    ``SequenceModel.from_config(SequenceModelConfig(...))`` builds the same model from a config;
    ``model.config`` is the config it was built from.
    """

    def __init__(self, n_in: int, n_out: int, d_model: int = 64, n_layers: int = 2,
                 cell: str | Cell = "paragru", mode: str = "parallel", regression: bool = False,
                 solver_options: dict | None = None, mlp_ratio: int = 4, **cell_kwargs):
        super().__init__()
        self.config = SequenceModelConfig(n_in, n_out, d_model, n_layers, cell, mode, regression, mlp_ratio,
                                          dict(solver_options or {}), dict(cell_kwargs))
        self.regression = regression
        self.embed = nn.Linear(n_in, d_model) if regression else nn.Embedding(n_in, d_model)
        self.blocks = nn.ModuleList([
            ResidualBlock(d_model, copy.deepcopy(cell) if isinstance(cell, Cell) else cell, mode=mode,
                          mlp_ratio=mlp_ratio, solver_options=solver_options, **cell_kwargs)
            for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_out)

    @classmethod
    def from_config(cls, config: SequenceModelConfig) -> "SequenceModel":
        """A new model (freshly initialised weights) built from a config.

        Args:
            config: a :class:`SequenceModelConfig`.

        Returns:
            The :class:`SequenceModel`.
        """
        if not isinstance(config, SequenceModelConfig):
            raise TypeError(f"config must be a SequenceModelConfig, got {type(config).__name__}")
        c = dataclasses.asdict(config)
        return cls(**{k: v for k, v in c.items() if k != "cell_kwargs"}, **c["cell_kwargs"])

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` (the config, the parameter dtype, the pararnn version and the
        SHA-256 of the weights file) and ``model.safetensors`` (the state_dict: tensors only, no
        code pickled) into ``directory`` (created if needed).

        Each file is written to a temporary name and renamed into place, weights first: an
        interrupted save leaves either the old pair, or new weights beside the old config, which
        :meth:`from_pretrained` refuses (the checksum differs), never a silent mixture.

        Args:
            directory: the folder to write into.
        """
        if not isinstance(self.config.cell, str):
            raise ValueError("save_pretrained needs a cell given by name (one of pararnn.models.CELLS); "
                             "a model built from a Cell instance can be saved with torch.save(model.state_dict())")
        from .. import __version__
        config = dataclasses.asdict(self.config)
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        meta = {**config, "dtype": dtype, "pararnn_version": __version__}
        try:
            json.dumps(meta)
        except TypeError as e:
            raise ValueError(f"the config must be JSON serialisable to be saved (solver_options, cell_kwargs): {e}") \
                from None
        os.makedirs(directory, exist_ok=True)
        weights = os.path.join(directory, WEIGHTS_FILE)

        def write_config(path):
            with open(path, "w") as f:
                f.write(json.dumps({**meta, "weights_sha256": _sha256(weights)}, indent=2) + "\n")

        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        _write_atomically(weights, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        _write_atomically(os.path.join(directory, CONFIG_FILE), write_config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location=None) -> "SequenceModel":
        """Load the model :meth:`save_pretrained` wrote.

        Args:
            directory: the folder holding ``config.json`` and ``model.safetensors``.
            map_location: device for the weights (as ``torch.load``'s).

        Returns:
            The :class:`SequenceModel`, in the saved dtype.
        """
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {os.fspath(directory)!r} (written by save_pretrained)")
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        raw.pop("pararnn_version", None)
        digest = raw.pop("weights_sha256", None)  # absent in saves before 0.2
        name = raw.pop("dtype", "float32")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{path}: config field dtype must name a torch dtype (e.g. 'float32'), got {name!r}")
        fields = {f.name for f in dataclasses.fields(SequenceModelConfig)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ValueError(f"{path} has unknown config fields {unknown}")
        try:
            config = SequenceModelConfig(**raw)
        except TypeError as e:
            raise TypeError(f"{path}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        weights = os.path.join(directory, WEIGHTS_FILE)
        if not os.path.isfile(weights):  # a save of pararnn 0.1: a state_dict file loaded weights-only
            weights = os.path.join(directory, LEGACY_WEIGHTS_FILE)
        if digest is not None and _sha256(weights) != digest:
            raise ValueError(f"{weights} does not match {path} (its SHA-256 differs from the one the config "
                             "records): the save that wrote them was interrupted; save the model again")
        model = cls.from_config(config).to(dtype)
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights, device=str(map_location or "cpu"))
        else:
            state = torch.load(weights, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
        return model

    def _embed(self, x):
        if not self.regression and (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"token ids must be an integer tensor [B, T], got dtype {x.dtype}")
        return self.embed(x)

    def forward(self, x, states=None, mode=None, lengths=None, cu_seqlens=None):
        """Run the model over whole sequences.

        Args:
            x: token ids ``[B, T]`` (or features ``[B, T, n_in]`` with ``n_in``).
            states: per layer ``[B, state]`` initial states (None: zeros).
            mode: ``"parallel"``, ``"sequential"`` or ``"auto"`` (None: the model's).
            lengths: ``[B]`` valid lengths of a right-padded batch.
            cu_seqlens: ``[N+1]`` offsets of a packed ``[1, total]`` batch (see :class:`pararnn.RNN`).

        Returns:
            ``(out [B, T, n_out], states)``: logits (or regression outputs) and, per layer, the
            final states ``[B, state]``.
        """
        h = self._embed(x)
        new_states = []
        for i, block in enumerate(self.blocks):
            h, hT = block(h, None if states is None else states[i], mode=mode, lengths=lengths,
                          cu_seqlens=cu_seqlens)
            new_states.append(hT)
        return self.head(self.norm(h)), new_states

    def solver_stats(self) -> list[dict]:
        """How the layers' solves went since the last :meth:`reset_solver_stats`.

        Returns:
            Per layer, :meth:`pararnn.SolveStats.summary` (Newton steps, fallbacks, safeguard uses).
        """
        return [block.rnn.stats.summary() for block in self.blocks]

    def reset_solver_stats(self) -> None:
        """Set every layer's solver statistics back to zero."""
        for block in self.blocks:
            block.rnn.stats.reset()

    def step(self, x_t, states=None, mask=None):
        """Decode one token through every layer.

        Args:
            x_t: token ids ``[B]`` (or features ``[B, n_in]``).
            states: per layer ``[B, state]`` (None: zeros).
            mask: ``[B]`` bool: False for sequences past their end, whose states are held (as with
                ``lengths``).

        Returns:
            ``(out [B, n_out], states)``.
        """
        h = self._embed(x_t)
        new_states = []
        for i, block in enumerate(self.blocks):
            h, s = block.step(h, None if states is None else states[i], mask)
            new_states.append(s)
        return self.head(self.norm(h)), new_states

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 mode: str | None = None) -> torch.Tensor:
        """Sample a continuation: ``prompt [B, T0]`` token ids -> ``[B, T0 + max_new_tokens]``.

        The prompt is prefilled in one call (``mode``: this model's mode by default, so parallel
        Newton), then each new token is decoded with :meth:`step`.

        Args:
            prompt: ``[B, T0]`` token ids.
            max_new_tokens: tokens to add.
            temperature: 0 is greedy.
            top_k: keep the k most likely tokens before sampling (None: all).
            generator: the random generator for sampling.
            mode: the prefill's mode (None: the model's).

        Returns:
            ``[B, T0 + max_new_tokens]`` token ids.
        """
        if self.regression:
            raise ValueError("generate needs a token model (regression=False)")
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"prompt must be token ids [B, T0] with T0 >= 1, got {getattr(prompt, 'shape', prompt)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        logits, states = self(prompt, mode=mode)  # [B, T0, V]
        last = logits[:, -1]
        out = [prompt]
        for i in range(max_new_tokens):
            token = _sample(last, temperature, top_k, generator)  # [B]
            out.append(token[:, None])
            if i + 1 < max_new_tokens:
                last, states = self.step(token, states)
        return torch.cat(out, 1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per row of ``logits [B, V]``."""
    if temperature == 0:
        return logits.argmax(-1)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("generate: the model's logits contain NaN or Inf")
    # relative to each row's largest logit, so a tiny temperature scales to -inf, never to +inf and NaN
    logits = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
