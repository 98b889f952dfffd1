"""What every study shares: run metadata, writable outputs, thread settings, DDP setup, plots."""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import subprocess
import sys
import tempfile
import time

from pararnn.utils.io import write_json_atomic  # noqa: F401 (re-exported for the studies)


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout pararnn runs from (None when installed from a wheel), with
    ``-dirty`` if tracked files outside ``results/`` differ from it. Read once per process: a run
    that writes its results file after every case (a tracked file under ``results/``) keeps the
    commit it started from, and edits made while it runs do not relabel code it already imported."""
    return commit_of(os.path.dirname(os.path.abspath(__file__)))


def commit_of(path: str) -> str | None:
    """The commit of the git checkout holding ``path`` (None outside one), ``-dirty`` if tracked
    files outside its ``results/`` folder differ from it."""
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        top = subprocess.run(["git", "-C", path, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", top, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _program() -> str:
    """How this run was started: ``python benchmarks/x.py`` for a script, else ``pararnn``."""
    script = sys.argv[0]
    if script.endswith(".py") and os.path.basename(script) != "__main__.py":
        return "python " + os.path.relpath(script)
    return "pararnn"


def run_metadata(settings: dict) -> dict:
    """Version, commit, date, machine and the settings actually used: the head of every results JSON."""
    from pararnn import __version__
    from pararnn.utils.timing import machine_info

    return {"pararnn": __version__, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([_program(), *sys.argv[1:]]) if sys.argv else None,
            "machine": machine_info(), "settings": settings}


def ensure_writable(path: str, what: str, folder: bool = False) -> None:
    """Fail now, not after the work, if ``path`` (a file, or a folder) cannot be written.

    Raises SystemExit naming the option ``what`` and the reason.
    """
    target = path if folder else (os.path.dirname(os.path.abspath(path)) or ".")
    try:
        if folder and os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"{path} exists and is not a folder")
        if not folder and os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder")
        os.makedirs(target, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".pararnn-write-test-"):
            pass
    except OSError as e:
        raise SystemExit(f"pararnn: cannot write {what} {path!r}: {e.strerror or e}") from None


def progress_bar(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", leave: bool = True,
             disable: bool = False):
    """A progress bar over ``iterable`` (or one updated by hand with ``total``): tqdm where it is
    installed (``pip install "pararnn[studies]"``), else a line on stderr at most every 10 s."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextProgress(iterable, desc, total, unit, disable)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable)


class _TextProgress:
    """The fallback of :func:`progress_bar` without tqdm: iterate it, or call ``update()``/``close()``."""

    def __init__(self, iterable, desc, total, unit, disable):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.t0, self.shown = 0, time.monotonic(), 0.0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and (now - self.shown >= 10 or self.n == self.total):
            self.shown = now
            of = "" if self.total is None else f"/{self.total}"
            print(f"{self.desc}: {self.n}{of} {self.unit} ({now - self.t0:.0f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def set_threads(n: int | None) -> None:
    """Pin torch's and numba's thread pools to ``n`` threads (None: leave them)."""
    if n is None:
        return
    import torch

    torch.set_num_threads(n)
    try:  # the compiled scans have their own thread pool
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass


def ddp_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


@contextlib.contextmanager
def figure(path: str, figsize=(5.5, 3.8), dpi: int = 110):
    """``with figure(path) as ax:`` draws on one matplotlib axis (Agg) and saves it to ``path``.
    Without matplotlib (``pip install "pararnn[studies]"``) the drawing is skipped, said once."""
    try:
        import matplotlib
    except ImportError:
        if not _SKIPPED_PLOTS:
            print("pararnn: matplotlib is not installed, plots are skipped (pip install \"pararnn[studies]\")",
                  file=sys.stderr)
        _SKIPPED_PLOTS.append(path)
        yield _NoAxis()
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


_SKIPPED_PLOTS: list[str] = []


class _NoAxis:
    """Stands in for a matplotlib axis where matplotlib is missing: every call does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
