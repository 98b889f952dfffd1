"""``call_with(root, tensors, fn, *args)``: any function run with a module's parameters and buffers
swapped for other tensors (:func:`torch.func.functional_call` for more than ``root.forward``)."""
from __future__ import annotations

import torch
from torch import nn


class _Bind(nn.Module):
    """Calls ``fn(*args)`` with ``root`` as a submodule, so functional_call can bind root's tensors
    around any function, not only ``root.forward``."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self.root = root

    def forward(self, fn, *args):
        return fn(*args)


def named_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``root`` by name (tied ones under each of their names)."""
    return dict([*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)])


def call_with(root: nn.Module, tensors: dict[str, torch.Tensor], fn, *args):
    """``fn(*args)`` while ``root``'s parameters and buffers named in ``tensors`` are those tensors
    (``fn`` reads them through ``root``, e.g. a bound method ``root.step``)."""
    bind = _Bind(root)
    return torch.func.functional_call(bind, {f"root.{k}": t for k, t in tensors.items()}, (fn, *args),
                                      tie_weights=False)
