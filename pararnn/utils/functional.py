"""``call_with(root, tensors, fn, *args)``: any function run with a module's parameters and buffers
swapped for other tensors (:func:`torch.func.functional_call` for more than ``root.forward``);
``jvp``: :func:`torch.func.jvp` that also holds under :func:`torch.inference_mode`;
``own_saved_tensors``: autograd graphs of pararnn's own that an enclosing checkpoint does not see."""
from __future__ import annotations

import contextlib

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


def jvp(f, primals: tuple, tangents: tuple):
    """:func:`torch.func.jvp`, also under :func:`torch.inference_mode`, where torch 2.11's forward
    AD returns zero tangents (2.13's does not): there the product is taken with inference mode off
    (:func:`autodiff_outside_inference`), on normal copies of ``primals`` and ``tangents``."""
    if not inference_mode_on():
        return torch.func.jvp(f, primals, tangents)
    with autodiff_outside_inference():
        return torch.func.jvp(f, tuple(p.clone() for p in primals), tuple(t.clone() for t in tangents))


@contextlib.contextmanager
def autodiff_outside_inference():
    """A context in which derivatives of a cell's step are right under :func:`torch.inference_mode`
    too: inference mode off (under it reverse mode records no graph, so a vector-Jacobian product
    is zero, and torch 2.11's forward AD gives zero tangents), grad mode off (nothing made here
    joins a graph). A no-op context outside inference mode. Tensors made in inference mode are
    inference tensors: clone them inside before differentiating with respect to them; a cell's
    parameters made there serve as they are in forward mode (reverse mode cannot save them)."""
    if not inference_mode_on():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def inference_mode_on() -> bool:
    """Whether :func:`torch.inference_mode` is on; False while torch.compile traces (dynamo cannot
    trace the query, and a compiled graph runs no autodiff of its own)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def own_saved_tensors():
    """A context in which autograd saves tensors as they are, whatever saved-tensor hooks enclose
    it (an activation checkpoint's, ``save_on_cpu``'s): for graphs pararnn builds and consumes itself
    (reverse-mode Jacobians, the first call's cell probe). A checkpoint that counted them would find
    fewer in its recompute (which does not probe again) and raise a CheckpointError."""
    return torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is)
