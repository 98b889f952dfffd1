"""`diagnose`: estimate a cell's largest Lyapunov exponent, which predicts parallel convergence.

Gonzalez et al. (2025), "Predictability enables parallelization": Newton on the whole sequence
converges fast (O((log T)^2) depth) when the dynamics are contractive/predictable (largest
Lyapunov exponent λ < 0) and cannot parallelise chaotic dynamics (λ > 0), where errors grow like
e^{λ t} along the sequence.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .solver.fallback import sequential_solve
from .structure import Diagonal


@dataclass
class Diagnosis:
    """Result of :func:`diagnose`.

    Attributes:
        lyapunov: largest Lyapunov exponent estimate, per step (natural log), max over the batch.
        per_sequence: ``[B]`` estimates.
        steps: time steps used.
        predictable: ``lyapunov < 0``.
        newton_iterations: Newton steps the parallel solve took on this input (None if not run).
        sweeps: multiple-shooting sweeps it took where Newton stalled (None if not run; see
            ``SolverOptions.shooting``).
        will_fall_back: whether that solve failed to converge, so that ``mode="parallel"`` falls
            back to the sequential loop on such inputs (None if not run).
        advice: what to expect from ``mode="parallel"``.
    """

    lyapunov: float
    per_sequence: torch.Tensor
    steps: int
    predictable: bool
    advice: str
    newton_iterations: int | None = None
    will_fall_back: bool | None = None
    sweeps: int | None = None


@torch.no_grad()
def diagnose(cell, x: torch.Tensor, h0: torch.Tensor | None = None, max_steps: int = 4096,
             seed: int = 0, solve: bool = True, **solver_options) -> Diagnosis:
    """Estimate the largest Lyapunov exponent of ``cell`` along its trajectory on ``x [B, T, D_in]``.

    The trajectory is computed sequentially (robust for any cell), then the Jacobians along it
    are multiplied onto a random unit vector with renormalisation (Benettin's method); for a
    diagonal cell the exponent is exact: ``max_i mean_t log|J_t,i|``. Uses the first
    ``max_steps`` steps.

    λ alone does not predict the Newton step count (cells of equal λ can take different numbers of
    steps), so with ``solve=True`` the advice also reports what the parallel solve
    (``pararnn.RNN(cell, **solver_options)``) actually did on this input: the steps it took, or
    that it did not converge and will fall back to the sequential loop.

    Args:
        cell: a :class:`pararnn.Cell`.
        x: ``[B, T, D_in]`` inputs.
        h0: ``[B, d]`` initial state (None: the cell's).
        max_steps: use the first ``max_steps`` steps of x.
        seed: seed of the random unit vector.
        solve: also run the parallel solve on x and report it.
        **solver_options: :class:`pararnn.SolverOptions` fields for that solve.

    Returns:
        A :class:`Diagnosis`: ``lyapunov`` (λ, per step), the solve's outcome and a line of advice.
    """
    x = x[:, :max_steps]
    u = cell.prepare(x)
    B, T = u.shape[:2]
    if h0 is None:
        h0 = cell.initial_state(B, cell.state_dtype(u), u.device)
    H = sequential_solve(cell.step, u, h0)  # [B, T, d]
    prev = torch.cat([h0.unsqueeze(1), H[:, :-1]], 1)
    _, J = cell.step_and_jacobian(prev.reshape(B * T, -1), u.reshape(B * T, *u.shape[2:]))
    J = J.reshape(B, T, *J.shape[1:])
    structure = cell.get_structure()
    if isinstance(structure, Diagonal):
        lam = J.abs().clamp_min(1e-300).log().mean(1).amax(-1)  # [B]
    else:
        g = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(B, cell.state_size, generator=g, dtype=torch.float64).to(H.device, H.dtype)
        v = v / v.norm(dim=-1, keepdim=True)
        total = torch.zeros(B, dtype=torch.float64, device=H.device)
        for t in range(T):
            v = structure.matvec(J[:, t], v)
            n = v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            total += n.squeeze(-1).double().log()
            v = v / n
        lam = total / T
    lam_max = float(lam.max())
    if not math.isfinite(lam_max):
        advice = "the trajectory or its Jacobians are not finite; parallel solving cannot work"
    elif lam_max < -1e-3:
        advice = (f"contractive (λ = {lam_max:.3g} < 0): errors shrink by e^λ per step on average, so "
                  f"Newton can converge in far fewer than T steps")
    elif lam_max <= 1e-3:
        advice = f"marginal (λ = {lam_max:.3g} ≈ 0): expect slow Newton convergence on long sequences"
    else:
        advice = (f"chaotic (λ = {lam_max:.3g} > 0): errors grow by e^λ per step; parallel Newton "
                  f"needs ~T iterations or fails: use mode='sequential'")
    iters = fall_back = sweeps = None
    if solve:
        from .rnn import RNN

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = RNN(cell, **{**solver_options, "on_fail": "warn"})(x, h0, return_info=True)[2]
        iters, fall_back, sweeps = info.iterations, not info.all_converged, info.sweeps
        if fall_back:
            advice += (f". The parallel solve of this input did not converge in {info.iterations} Newton steps: "
                       f"mode='parallel' will fall back to the sequential loop on such inputs (use "
                       f"mode='sequential', raise max_iters, or bound the recurrent weights)")
        else:
            also = (f" and {info.sweeps} multiple-shooting sweeps of {info.shooting_window} steps (Newton "
                      f"stalled)" if info.sweeps else "")
            advice += (f". The parallel solve of this input took {info.iterations} Newton steps{also}; expect "
                       f"about as many on similar inputs")
    return Diagnosis(lam_max, lam.float().cpu(), T, lam_max < 0, advice, iters, fall_back, sweeps)
