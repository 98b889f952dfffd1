"""Hugging Face transformers models over pararnn's residual blocks (``pip install "pararnn[hf]"``).

Importing this module registers ``"pararnn"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so transformers' own tools (``from_pretrained``, ``generate``,
``Trainer``) work with any cell of the zoo::

    import pararnn.hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("path/to/saved")   # a folder save_pretrained wrote

The recurrent state is the cache: ``forward(..., use_cache=True)`` returns ``state`` (one
``[B, state]`` tensor per layer), and ``generate`` passes it back with one new token per step.
The prompt is prefilled in one parallel solve; left-padded batches (``attention_mask``) are solved
as right-padded ones, each sequence starting from its first real token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.utils import ModelOutput

from .inputs import padding_from_mask, rotate
from .models.layers import CELLS, ResidualBlock
from .rnn import MODES


class PararnnConfig(PretrainedConfig):
    """The configuration of :class:`PararnnModel` and :class:`PararnnForCausalLM`.

    Args:
        vocab_size: number of token ids.
        hidden_size: the model width ``d_model`` (each cell's state size follows from it).
        num_hidden_layers: residual blocks (norm, RNN, MLP).
        cell: a name from ``pararnn.models.CELLS``.
        mode: the solver mode of every layer: ``"parallel"``, ``"sequential"`` or ``"auto"``.
        mlp_ratio: the MLP's hidden width over ``hidden_size``.
        solver_options: ``pararnn.SolverOptions`` fields for every layer (JSON values).
        cell_kwargs: keyword arguments of the cell's constructor (e.g. ``{"heads": 4}``).

    Example::

        config = PararnnConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, cell="paragru")
    """

    model_type = "pararnn"

    def __init__(self, vocab_size: int = 256, hidden_size: int = 64, num_hidden_layers: int = 2,
                 cell: str = "paragru", mode: str = "parallel", mlp_ratio: int = 4,
                 solver_options: dict | None = None, cell_kwargs: dict | None = None, **kwargs):
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size),
                            ("num_hidden_layers", num_hidden_layers), ("mlp_ratio", mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(cell, str) or cell.lower() not in CELLS:
            raise ValueError(f"cell must be one of {list(CELLS)}, got {cell!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.cell, self.mode, self.mlp_ratio = cell, mode, mlp_ratio
        self.solver_options, self.cell_kwargs = dict(solver_options or {}), dict(cell_kwargs or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


@dataclass
class PararnnModelOutput(ModelOutput):
    """What :class:`PararnnModel` returns.

    Attributes:
        last_hidden_state: ``[B, T, hidden_size]``.
        state: per layer ``[B, state]``, the recurrent state to continue from (with ``use_cache``).
        hidden_states: every layer's input and the final output (with ``output_hidden_states``).
    """

    last_hidden_state: torch.Tensor | None = None
    state: list[torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class PararnnCausalLMOutput(ModelOutput):
    """What :class:`PararnnForCausalLM` returns.

    Attributes:
        loss: the mean next-token cross-entropy (with ``labels``).
        logits: ``[B, T, vocab_size]``.
        state: per layer ``[B, state]``, the recurrent state to continue from.
        hidden_states: as :class:`PararnnModelOutput`'s.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: list[torch.Tensor] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class PararnnPreTrainedModel(PreTrainedModel):
    """The transformers base class of the pararnn models: weights initialised as torch.nn's modules
    and pararnn's cells initialise them (built from a :class:`PararnnConfig`).
    """

    config_class = PararnnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["ResidualBlock"]
    supports_gradient_checkpointing = True  # activation_checkpointing_enable(): one checkpoint per block

    def _init_weights(self, module):
        pass  # the modules' own initialisation (the cells choose theirs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the recurrent state is the cache (``state``), not key/value tensors


class PararnnModel(PararnnPreTrainedModel):
    """Token embedding, ``num_hidden_layers`` residual blocks (norm, pararnn.RNN, MLP) and a final norm.

    ``forward(input_ids [B, T], attention_mask [B, T] | None, state | None)`` returns
    :class:`PararnnModelOutput`. ``attention_mask`` marks left or right padding (0 = padding).

    Args:
        config: a :class:`PararnnConfig`.
    """

    def __init__(self, config: PararnnConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList([
            ResidualBlock(d, config.cell, mode=config.mode, mlp_ratio=config.mlp_ratio,
                          solver_options=config.solver_options, **config.cell_kwargs)
            for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(d)
        self.gradient_checkpointing = False  # set by transformers' activation_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, state: list[torch.Tensor] | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> PararnnModelOutput:
        """The residual blocks over the tokens, each solved in parallel (one step per layer when
        given a state and one token).

        Args:
            input_ids: ``[B, T]`` token ids (or pass ``inputs_embeds``).
            attention_mask: ``[B, T]``, 1 for tokens and 0 for padding (left or right).
            inputs_embeds: ``[B, T, hidden_size]`` in place of ``input_ids``.
            state: per layer ``[B, state]``, the recurrent state to continue from (the cache).
            use_cache: False leaves the final state out (default: returned).
            output_hidden_states: also return every layer's input and the last output.
            return_dict: accepted for transformers' API (the output is always a ModelOutput).
            **kwargs: transformers' extra arguments (ignored).

        Returns:
            :class:`PararnnModelOutput`: ``last_hidden_state [B, T, hidden_size]``, ``state`` (per
            layer ``[B, state]``, with ``use_cache``) and ``hidden_states``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, hidden_size]")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, d]
        B, T = x.shape[:2]
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state must hold one [B, state] tensor per layer ({len(self.layers)}), got {len(state)}")
        mask = None if attention_mask is None else attention_mask[:, -T:].bool()  # generate passes the whole history
        hidden = [x] if output_hidden_states else None
        if state is not None and T == 1:  # one token of a decode: each layer's step
            new_state = []
            for layer, h in zip(self.layers, state):
                y, h = layer.step(x[:, 0], h, None if mask is None else mask[:, 0])
                x = y[:, None]
                new_state.append(h)
                if hidden is not None:
                    hidden.append(x)
        else:
            x, new_state = self._solve(x, mask, state, hidden)
        out = self.norm(x)
        if hidden is not None:
            hidden[-1] = out
        return PararnnModelOutput(out, new_state if use_cache is not False else None,
                                  tuple(hidden) if hidden is not None else None)

    def _solve(self, x, mask, state, hidden):
        """The layers over ``x [B, T, d]`` in parallel (per layer one solve), padding per ``mask``."""
        lengths, shift = padding_from_mask(mask, state is not None)
        if shift is not None:  # left padding: rotate each row so its tokens come first
            x = rotate(x, shift)
        new_state = []
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            h0 = None if state is None else state[i]
            if checkpointed:  # the block's activations recomputed in the backward (transformers' checkpoint function)
                x, h = self._gradient_checkpointing_func(layer.__call__, x, h0, None, lengths)
            else:
                x, h = layer(x, h0, lengths=lengths)
            new_state.append(h)
            if hidden is not None:
                hidden.append(x if shift is None else rotate(x, -shift))
        return (x if shift is None else rotate(x, -shift)), new_state


class PararnnForCausalLM(PararnnPreTrainedModel, GenerationMixin):
    """:class:`PararnnModel` with a language-model head; ``generate`` decodes with the recurrent state.

    ``forward(input_ids [B, T], attention_mask, state, labels)`` returns
    :class:`PararnnCausalLMOutput`: ``logits [B, T, vocab_size]`` and, with ``labels [B, T]``
    (shifted inside, -100 ignored), the mean next-token cross-entropy.

    Example::

        model = PararnnForCausalLM(PararnnConfig(vocab_size=256, hidden_size=64))
        tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=10, do_sample=False)

    Args:
        config: a :class:`PararnnConfig`.
    """

    def __init__(self, config: PararnnConfig):
        super().__init__(config)
        self.model = PararnnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, state: list[torch.Tensor] | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> PararnnCausalLMOutput:
        """Logits for every position and, with labels, the next-token loss.

        Args:
            input_ids: ``[B, T]`` token ids (or pass ``inputs_embeds``).
            attention_mask: ``[B, T]``, 1 for tokens and 0 for padding (left or right).
            inputs_embeds: ``[B, T, hidden_size]`` in place of ``input_ids``.
            state: per layer ``[B, state]``, the recurrent state to continue from (the cache).
            labels: ``[B, T]`` token ids (shifted inside; -100 is ignored).
            use_cache: False leaves the final state out (default: returned).
            output_hidden_states: also return every layer's input and the last output.
            return_dict: accepted for transformers' API (the output is always a ModelOutput).
            **kwargs: transformers' extra arguments (passed to the loss, e.g. ``num_items_in_batch``).
            logits_to_keep: compute logits for the last this many positions only (0: all).

        Returns:
            :class:`PararnnCausalLMOutput`: ``loss`` (with labels), ``logits [B, T, vocab_size]``,
            ``state`` and ``hidden_states``.
        """
        out = self.model(input_ids, attention_mask, inputs_embeds, state, use_cache, output_hidden_states)
        h = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return PararnnCausalLMOutput(loss, logits, out.state, out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, state=None, attention_mask=None, inputs_embeds=None,
                                      use_cache=None, **kwargs):
        """The prompt whole on the first call; afterwards the newest token with the state."""
        if state is not None:
            input_ids, inputs_embeds = input_ids[:, -1:], None
        elif inputs_embeds is not None:
            input_ids = None
        return {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "state": state,
                "attention_mask": attention_mask, "use_cache": True if use_cache is None else use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs["state"] = outputs.state
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)


AutoConfig.register("pararnn", PararnnConfig, exist_ok=True)
AutoModel.register(PararnnConfig, PararnnModel, exist_ok=True)
AutoModelForCausalLM.register(PararnnConfig, PararnnForCausalLM, exist_ok=True)

__all__ = ["PararnnCausalLMOutput", "PararnnConfig", "PararnnForCausalLM", "PararnnModel", "PararnnModelOutput",
           "PararnnPreTrainedModel"]
