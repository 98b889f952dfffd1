"""pararnn: train nonlinear RNNs in parallel over the sequence length (Newton + parallel scans).

The public API is imported here. ``pararnn.models`` (the cell zoo and layers), ``pararnn.nn``
(torch.nn drop-ins), ``pararnn.fla`` (a layer with flash-linear-attention's convention) and
``pararnn.distributed`` (sequence parallelism) are imported by their users, as is ``pararnn.hf``
(which needs transformers); ``process_group=`` imports ``pararnn.distributed`` where it is
missing. The ``pararnn`` command lives in ``pararnn_studies``, so ``pararnn --help`` does not
import this package.
"""
from __future__ import annotations

from .cell import Cell, autodiff_step_and_jacobian
from .diagnostics import Diagnosis, diagnose
from .rnn import RNN
from .scan import linear_scan
from .solver import (ConvergenceError, ConvergenceWarning, SolverInfo, SolverOptions, SolveStats, choose_mode,
                     sequential_solve)
from .structure import Block, Dense, Diagonal, Structure
from .verify import CellCheckError, check_structure, dense_jacobian

__version__ = "0.2.0"

__all__ = ["Block", "Cell", "CellCheckError", "ConvergenceError", "ConvergenceWarning", "Dense", "Diagnosis",
           "Diagonal", "RNN", "SolveStats", "SolverInfo", "SolverOptions", "Structure", "autodiff_step_and_jacobian",
           "check_structure", "choose_mode", "dense_jacobian", "diagnose", "linear_scan", "sequential_solve"]

_SUBMODULES = ("models", "nn", "fla", "distributed")


def __getattr__(name: str):
    """``pararnn.models``, ``pararnn.nn``, ``pararnn.fla`` and ``pararnn.distributed`` without importing them first
    (the API above is imported explicitly; these clients load on first use)."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pararnn' has no attribute {name!r}")
