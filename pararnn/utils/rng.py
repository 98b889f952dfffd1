"""The random stream around pararnn's own calls of a cell's code (a dropout in ``prepare``)."""
from __future__ import annotations

import torch


def untouched_rng(device: torch.device):
    """A context after which the caller's generators (CPU, and ``device``'s if CUDA) are as they
    were before it: pararnn's own checks must not shift the user's random stream."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class RandomState:
    """The random state now (CPU, and ``device``'s if CUDA), to start from again: each pass of a
    repeated computation (a probe's inputs, sequence parallelism's passes) draws the same numbers."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.gpu is not None:
            torch.cuda.set_rng_state(self.gpu, self.device)
