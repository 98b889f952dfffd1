"""Median wall-clock timing with device synchronisation, and a description of the machine."""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (CUDA) so timings are real."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                device: torch.device | str | None = None, max_seconds: float | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    With ``max_seconds``, stops repeating once that much time was spent (at least one run).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 0,
                        device: torch.device | str | None = None, min_turn_s: float = 0.0,
                        statistic: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Median seconds per call of each callable, the callables run in turn round by round, so
    machine noise hits all of them alike (after ``warmup`` untimed rounds).

    ``statistic``: what sums up a callable's rounds (default the median; ``min`` where the noise
    only ever adds time, as a shared VM's does, and the question is which of two is faster).

    ``min_turn_s``: each turn runs its callable ``k`` times in a row and records the mean; ``k``
    comes from the faster of two sizing calls, so that a turn takes about that long (a first call
    that compiles must not size its turns: with ``k`` = 1, a 1-thread compiled-cell forward after
    JAX's turn measured 8 ms against 5.5 ms in turns of 20). Longer turns also amortise whatever
    one callable leaves behind for the next (caches, a runtime's threads; the cause was not
    isolated): with one call per turn, a 1-thread JAX/pararnn comparison measured pararnn's
    forward at 9.9 ms where turns of 5 calls measured 8.4 ms (and JAX's 7.3 against 6.9 ms).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    block = dict.fromkeys(fns, 1)
    if min_turn_s > 0:
        for k, fn in fns.items():
            fastest = math.inf
            for _ in range(2):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                fastest = min(fastest, time.perf_counter() - t)
            block[k] = max(1, math.ceil(min_turn_s / max(fastest, 1e-9)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(block[k]):
                fn()
            sync(device)
            times[k].append((time.perf_counter() - t) / block[k])
    return {k: statistic(v) for k, v in times.items()}


def copy_bandwidth(nbytes: int, device: torch.device | str = "cpu", repeats: int = 10) -> float:
    """Measured copy bandwidth in bytes/s (read + write) into an existing buffer of ``nbytes``."""
    n = max(1, nbytes // 8)  # each copy reads n*4 and writes n*4 bytes
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeats=repeats, warmup=2, device=device)
    return 2 * n * 4 / t


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What ran the numbers: CPU/GPU, cores, memory, library versions, thread counts."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for mod in ("numba", "triton", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


class Deadline:
    """A time budget for a benchmark part: past it, ``over(case)`` is True and the case is named in
    ``skipped`` (a case already started runs to its end); ``left()`` is the seconds remaining."""

    def __init__(self, seconds: float):
        self.end, self.skipped = time.perf_counter() + seconds, []

    def over(self, case: str) -> bool:
        if time.perf_counter() > self.end:
            self.skipped.append(case)
            return True
        return False

    def left(self) -> float:
        return max(0.0, self.end - time.perf_counter())

