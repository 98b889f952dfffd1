"""Multiple shooting: windows of the iterate re-run by the cell where Newton stalls."""
from __future__ import annotations

from typing import Callable

import torch

from .evaluate import hold_padded


def shooting_window(option: int | str | None, T: int) -> int | None:
    """The window length of multiple-shooting sweeps for a solve of T steps (``SolverOptions.shooting``)."""
    if option is None:
        return None
    if option == "auto":
        return AUTO_SHOOTING_WINDOW if T >= 4 * AUTO_SHOOTING_WINDOW else max(1, T // 4)
    return min(int(option), T)


# "auto" first window of the sweeps (they grow L, L, 2L, ...: a long memory costs O(log) sweeps);
# set on hard cells by benchmarks/bench_convergence.py (history: results/calibration_history.md).
AUTO_SHOOTING_WINDOW = 256
# A Newton step that leaves a sequence's max residual above this fraction of the one before it has
# stalled there (quadratic convergence divides it by far more; a step that blows up and is undone
# leaves it where it was), and a sweep goes first before its next step.
SWEEP_STALL = 0.5


def shooting_sweep(step: Callable, S: torch.Tensor, u: torch.Tensor, L: int,
                   mask: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
    """One multiple-shooting sweep, in place: every window ``[cL, cL+L)`` of the iterate is re-run by
    the cell from the state entering it, all windows of all (or the chosen) sequences at once.

    ``S [B, T+1, d]`` holds (h0, h_1..h_T) (window c starts from ``S[:, cL]``), ``u [B, T, *]``,
    ``mask [B, T]`` or None (padded steps hold the state), ``rows`` a 1-D index of the sequences to
    sweep (None: all; only their steps are gathered, never whole rows of u or S). A loop of L steps
    over ``[R·⌈T/L⌉, d]`` rows (R sequences); afterwards the residual is zero inside every window (up
    to rounding) and only the junctions ``t = cL`` (c ≥ 1) carry one: window c is exact once the
    state entering it is, so sweeps alone are exact after ⌈T/L⌉ of them.
    """
    T = u.shape[1]
    d = S.shape[-1]
    n = -(-T // L)
    sel = slice(None) if rows is None else rows  # basic slicing first, then the rows: small gathers
    h = S[:, 0:T:L][sel]  # [R, n, d]: the states entering the windows (a copy)
    R = h.shape[0]
    h = h.reshape(R * n, d)
    for k in range(L):
        nk = -(-(T - k) // L)  # windows that still have a step k (only the last can be shorter)
        if nk < n:
            h, n = h.view(R, n, d)[:, :nk].reshape(R * nk, d), nk
        uk = u[:, k::L][sel, :n]  # [R, n, *]: step k of every window
        hk = step(h, uk.reshape(R * n, *uk.shape[2:]))
        if mask is not None:
            hk = hold_padded(hk, None, h, mask[:, k::L][sel, :n].reshape(R * n), None)[0]
        S[:, 1 + k::L][sel, :n] = hk.view(R, n, d)
        h = hk


