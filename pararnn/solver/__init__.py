"""The Newton solver: options and report (:mod:`.options`), the iteration (:mod:`.newton`), the
cell's evaluation in pieces (:mod:`.evaluate`), its compiled form (:mod:`.compile`), the safeguard
(:mod:`.safeguard`), multiple shooting (:mod:`.shooting`), the sequential loop and the failure
policy (:mod:`.fallback`), and the ``mode="auto"`` rule (:mod:`.mode`)."""
from .fallback import sequential_solve
from .mode import choose_mode
from .newton import newton_solve
from .options import ConvergenceError, ConvergenceWarning, SolverInfo, SolverOptions, SolveStats

__all__ = ["ConvergenceError", "ConvergenceWarning", "SolveStats", "SolverInfo", "SolverOptions", "choose_mode",
           "newton_solve", "sequential_solve"]
