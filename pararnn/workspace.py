"""CPU solver buffers kept between calls, so a loop of solves does not page-fault them in afresh.

On CPU, torch allocates a large tensor with a fresh ``mmap`` (glibc serves blocks above 32 MB so)
and its first write faults in every page (an order of magnitude slower than writing a reused
buffer), and a Newton solve allocates several such buffers per call. CUDA has torch's caching allocator and needs none of this.

A :class:`Workspace` hands out buffers by name and keeps the most recent ones (per thread) up to
:data:`WORKSPACE_BYTES` in all, least recently used first out. It never hands out the same buffer
twice while a solve that took it is running (a solve nested in a cell's ``step`` gets fresh ones).
Only buffers that do not outlive the solve may come from here; :func:`clear` frees them all.
"""
from __future__ import annotations

import collections
import contextlib
import threading

import torch

# Most bytes of buffers kept per thread between solves (the rest are freed as before).
WORKSPACE_BYTES = 512 << 20

_local = threading.local()


class Workspace:
    """Named CPU buffers for one solve at a time (see the module docstring)."""

    def __init__(self):
        self.buffers: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self.busy = False

    def take(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``shape`` buffer: a kept one when this name last had that shape, dtype and device."""
        # inference tensors (made under torch.inference_mode) cannot be written outside it: their own buffers
        key = (name, tuple(shape), dtype, torch.device(device), torch.is_inference_mode_enabled())
        buf = self.buffers.pop(key, None)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=device)
        if buf.nbytes <= WORKSPACE_BYTES:
            self.buffers[key] = buf  # most recently used last
            while self.kept_bytes() > WORKSPACE_BYTES:
                self.buffers.popitem(last=False)
        return buf

    def kept_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


class Fresh:
    """A workspace that keeps nothing (every buffer is new): for a busy workspace, a non-CPU device,
    or a caller that passes none."""

    @staticmethod
    def take(name, shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def workspace(device: torch.device):
    """This thread's workspace for the duration of one solve on ``device`` (fresh buffers if the
    device is not a CPU or the workspace is already in use by an enclosing solve)."""
    ws = getattr(_local, "ws", None)
    if ws is None:
        ws = _local.ws = Workspace()
    if torch.device(device).type != "cpu" or ws.busy:
        yield Fresh
        return
    ws.busy = True
    try:
        yield ws
    finally:
        ws.busy = False


def clear() -> None:
    """Free this thread's kept buffers."""
    ws = getattr(_local, "ws", None)
    if ws is not None:
        ws.buffers.clear()


def kept_bytes() -> int:
    """Bytes of buffers this thread keeps between solves."""
    ws = getattr(_local, "ws", None)
    return 0 if ws is None else ws.kept_bytes()
