"""pararnn: train nonlinear RNNs in parallel over the sequence length (Newton + parallel scans).

The public names load on first use (PEP 562), so ``pararnn --version`` and ``pararnn --help``
answer without importing torch. The first one loaded brings the whole API, including
``pararnn.distributed`` (which registers the sequence-parallel context; ``process_group=`` also
imports it where it is missing). Every submodule imports on its own (``import pararnn.scan``).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_API = {
    "Cell": "cell", "autodiff_step_and_jacobian": "cell", "check_structure": "cell", "dense_jacobian": "cell",
    "Block": "structure", "Dense": "structure", "Diagonal": "structure", "Structure": "structure",
    "ConvergenceError": "newton", "ConvergenceWarning": "newton", "SolverInfo": "newton",
    "SolverOptions": "newton", "sequential_solve": "newton",
    "RNN": "rnn", "SolveStats": "rnn", "choose_mode": "rnn",
    "linear_scan": "scan",
    "Diagnosis": "diagnostics", "diagnose": "diagnostics",
}
_SUBMODULES = ("cell", "structure", "newton", "rnn", "scan", "diagnostics", "dispatch", "parallel", "distributed",
               "kernels", "models", "nn", "studies", "utils")

__all__ = sorted(_API)


def _load_api() -> None:
    """Import the API and bind every public name (``pararnn.diagnose`` is the function, not the
    submodule of the same name, which importing it would otherwise bind)."""
    if "RNN" in globals():
        return
    modules = {mod: importlib.import_module(f".{mod}", __name__) for mod in dict.fromkeys(_API.values())}
    importlib.import_module(".distributed", __name__)  # registers the process_group context
    globals().update({name: getattr(modules[mod], name) for name, mod in _API.items()})


def __getattr__(name: str):
    if name in _API:
        _load_api()
        return globals()[name]
    if name in _SUBMODULES:  # a submodule alone (`from . import dispatch` inside the package lands here too)
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pararnn' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API, *_SUBMODULES])
