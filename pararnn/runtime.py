"""Process-wide settings, each opt-in: importing pararnn changes none of them.

- :func:`fork_safe_workers`: for programs that fork worker processes (a ``fork`` multiprocessing
  pool, DataLoader workers) after a parallel solve on the CPU. GNU OpenMP, which numba and torch
  use for their thread pools, hangs a forked child once the parent has used the pool. This picks
  numba's fork-safe threading layer (TBB, a non-GNU OpenMP, or numba's own workqueue) unless the
  user chose one, and gives every forked child one torch thread (as DataLoader workers have).
  Call it before the first solve; ``spawn`` workers need none of this.
- :func:`set_heap_trimming`: between the chunks of a CPU solve with ``chunk_size``, glibc's heap
  gives its free pages back to the OS when it holds more than ``memory_budget`` bytes of freed
  memory (``malloc_trim``; glibc keeps freed buffers of up to 32 MB and reuses them poorly when
  chunks' temporaries interleave, so RSS grew chunk after chunk). It returns only freed pages and
  changes no allocator setting, so it is on by default; ``set_heap_trimming(False)`` turns it off.
  Measurements: ``benchmarks/bench_chunked.py`` and its results file.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

_state = {"fork_handler": False, "heap_trimming": True, "numba_started": False}


def _one_thread_in_forked_child() -> None:
    torch.set_num_threads(1)


def fork_safe_workers() -> str | None:
    """Make CPU solves safe to follow with ``fork``: numba's fork-safe threading layer (unless
    ``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER`` was set) and one torch thread in
    every forked child. Idempotent; call it before the first solve.

    Returns:
        numba's configured threading layer (None without numba).
    """
    if not _state["fork_handler"]:
        os.register_at_fork(after_in_child=_one_thread_in_forked_child)
        _state["fork_handler"] = True
    try:
        import numba
    except ImportError:
        return None
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "forksafe"
    return numba.config.THREADING_LAYER


def numba_threads() -> int:
    """numba's thread count for the calling thread, for the CPU scan's lanes.

    numba starts its thread pool on the first such call, and on its OpenMP layer that sets the
    calling thread's OpenMP thread count, which torch's CPU ops share: a user's
    ``torch.set_num_threads(1)`` became numba's count (and every compiled graph, guarded on torch's
    thread count, compiled again). torch's count is put back as it was. Not an opt-in setting: it
    undoes a change, so the process keeps the user's."""
    import numba

    if _state["numba_started"]:
        return numba.get_num_threads()
    before = torch.get_num_threads()
    n = numba.get_num_threads()
    _state["numba_started"] = True
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
    return n


def set_heap_trimming(enabled: bool) -> None:
    """Whether chunked CPU solves return freed heap pages to the OS between chunks (default: on).

    Args:
        enabled: True to trim (glibc's ``malloc_trim``) when the heap holds more than the solve's
            ``memory_budget`` of freed memory, False to leave the heap alone.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _state["heap_trimming"] = enabled


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    """glibc's ``(malloc_trim, mallinfo2)``, or None (another C library or OS, glibc < 2.33)."""
    try:
        libc = ctypes.CDLL(None)
        trim, info = libc.malloc_trim, libc.mallinfo2
    except (OSError, AttributeError):
        return None
    info.restype = _MallInfo2
    return trim, info


def release_freed_memory(device: torch.device, budget: int) -> None:
    """Between the chunks of a CPU solve: when glibc's heap holds more than ``budget`` bytes of
    freed memory, give its free pages back to the OS (see :func:`set_heap_trimming`)."""
    libc = _glibc() if device.type == "cpu" and _state["heap_trimming"] else None
    if libc is not None and libc[1]().fordblks > budget:
        libc[0](0)


__all__ = ["fork_safe_workers", "set_heap_trimming"]
