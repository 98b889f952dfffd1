"""``mode="auto"``: the parallel solve or the sequential loop, by the work per step."""
from __future__ import annotations

import torch

from ..kernels.dispatch import auto_backend
from ..structure import as_structure


def choose_mode(B: int, T: int, d: int, device: torch.device, structure="diagonal",
                training: bool = True, dtype: torch.dtype = torch.float32, backend: str = "auto",
                compile_cell: bool = False) -> str:
    """The ``mode="auto"`` rule (measurements behind it: docs/convergence.md, "Choosing a mode").

    - Never a parallel solve whose scan would be the PyTorch loop over T (once per Newton step):
      sequential wherever :func:`pararnn.kernels.dispatch.auto_backend` answers ``"reference"`` (with
      ``backend="auto"``; e.g. a CPU without numba).
    - CUDA: parallel (Triton, or the log-depth ``"assoc"`` scan where no kernel exists; the scan
      is O(log T) deep and the step evaluations fill the device; not measured on a GPU yet).
    - CPU: the sequential loop costs ~T × per-step op latency, nearly independent of width; the
      parallel solve costs ~(Newton iterations) × B·T·d·k element operations, k the Jacobian
      width (block size, or d for dense; counted as at least 8 for diagonal cells, whose
      evaluation is a dozen elementwise ops per entry). Parallel wins when the work per step,
      ``B·d·max(k, 8)``, is small: up to 8192 when training (the parallel backward is one scan,
      the sequential one another T-step loop) and up to 1024 for inference. With
      ``compile_cell=True`` (the fused evaluation, 1.5-2.5× cheaper) and k <= 8 the limits are
      32768 and 4096 (dense cells keep the eager limits: their cost is the d×d Jacobians and
      scan, not the elementwise evaluation). T < 64 stays sequential.

    The limits are set by ``benchmarks/bench_auto.py`` on two kinds of machine (an AMD EPYC and an
    Intel Xeon VM, results/bench_auto_*; the figures and their machines are in those files): each
    is the largest work per step where the parallel solve was at least as fast as the loop on both.

    Args:
        B: batch size.
        T: sequence length.
        d: state size.
        device: where the solve runs.
        structure: the cell's Jacobian structure (or its name).
        training: whether gradients will be taken.
        dtype: the state's dtype.
        backend: the scan backend asked for (``SolverOptions.backend``).
        compile_cell: whether the cell evaluation is compiled (resolved, not ``"auto"``).

    Returns:
        ``"parallel"`` or ``"sequential"``.
    """
    structure = as_structure(structure, d)
    if backend == "auto" and auto_backend(device, dtype, structure, d) == "reference":
        return "sequential"
    if device.type == "cuda":
        return "parallel"
    k = structure.width(d)
    if compile_cell and k <= AUTO_MIN_WIDTH:  # the fused evaluation cheapens elementwise work, not d×d Jacobians
        limit = AUTO_WORK_TRAINING_COMPILED if training else AUTO_WORK_INFERENCE_COMPILED
    else:
        limit = AUTO_WORK_TRAINING if training else AUTO_WORK_INFERENCE
    return "parallel" if (T >= AUTO_MIN_T and B * d * max(k, AUTO_MIN_WIDTH) <= limit) else "sequential"


# The CPU rule's limits on the work per step B·d·max(k, 8) (a diagonal cell's evaluation is about 8
# elementwise ops per entry), and the shortest T worth Newton's fixed cost: set by
# benchmarks/bench_auto.py on an AMD EPYC and an Intel Xeon VM (see choose_mode).
AUTO_WORK_TRAINING = 8192
AUTO_WORK_INFERENCE = 1024
AUTO_WORK_TRAINING_COMPILED = 32768  # with compile_cell
AUTO_WORK_INFERENCE_COMPILED = 4096
AUTO_MIN_T = 64
AUTO_MIN_WIDTH = 8


