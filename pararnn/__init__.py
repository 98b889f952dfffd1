"""pararnn: train nonlinear RNNs in parallel over the sequence length (Newton + parallel scans)."""
from .diagnose import Diagnosis, diagnose
from .cell import Cell, autodiff_step_and_jacobian, check_structure, dense_jacobian
from .newton import ConvergenceError, ConvergenceWarning, SolverInfo, SolverOptions, sequential_solve
from .rnn import RNN, choose_mode
from .scan import linear_scan
from .structure import Block, Dense, Diagonal, Structure
from . import distributed  # noqa: E402 (registers the sequence-parallel context; pararnn.distributed)

__version__ = "0.1.0"

__all__ = [
    "Block",
    "Dense",
    "Diagonal",
    "Structure",
    "Cell",
    "ConvergenceError",
    "ConvergenceWarning",
    "Diagnosis",
    "RNN",
    "SolverInfo",
    "SolverOptions",
    "autodiff_step_and_jacobian",
    "check_structure",
    "choose_mode",
    "dense_jacobian",
    "diagnose",
    "linear_scan",
    "sequential_solve",
]
