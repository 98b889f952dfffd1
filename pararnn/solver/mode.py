"""``mode="auto"``: the parallel solve or the sequential loop, by the work per step."""
from __future__ import annotations

import torch

from ..kernels.dispatch import auto_backend
from ..structure import Dense, as_structure
from .compile import unshared_blocks


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
      parallel solve costs ~(Newton iterations) × B·T·d × (element operations per state entry).
      Parallel wins when the work per step, ``B·d·w`` (:func:`step_work`), is small: up to 8192
      when training (the parallel backward is one scan, the sequential one another T-step loop)
      and up to 1024 for inference. With ``compile_cell=True`` (the fused evaluation, 1.5-2.5×
      cheaper) and blocks of at most 8 the limits are 32768 and 4096 (dense cells keep the eager
      limits: their cost is the d×d Jacobians and scan, not the elementwise evaluation). Cells
      with unshared ``Block(k)`` Jacobians, k > 1, take the compiled limits compiled or not: their eager
      evaluation costs 0.8-1.2× their compiled one (``compile_cell="auto"`` leaves a
      hand-written one eager, :func:`pararnn.solver.compile.fusion_pays`). T < 64 stays
      sequential.

    The limits are set by ``benchmarks/bench_auto.py`` (results/bench_auto_*; the figures and their
    machines are in those files) on an AMD EPYC and an Intel Xeon VM: the largest work per step
    where a parallel ParaGRU solve was about as fast as the loop or faster on both.

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
    fused = compile_cell or unshared_blocks(structure)  # eager ≈ compiled there
    if fused and structure.width(d) <= AUTO_MIN_WIDTH:  # the fused evaluation cheapens elementwise work, not d×d Jacobians
        limit = AUTO_WORK_TRAINING_COMPILED if training else AUTO_WORK_INFERENCE_COMPILED
    else:
        limit = AUTO_WORK_TRAINING if training else AUTO_WORK_INFERENCE
    return "parallel" if (T >= AUTO_MIN_T and step_work(B, d, structure) <= limit) else "sequential"


def step_work(B: int, d: int, structure="diagonal") -> int:
    """The work per time step that ``mode="auto"`` weighs on CPU: ``B·d·w``, w the element
    operations per state entry of a parallel solve's step, relative to the loop's: 8 for a
    diagonal Jacobian (its evaluation is a dozen elementwise ops per entry), ``8·k²`` for
    ``Block(k)`` (k entries per row, and the scan combines k×k blocks; measured for k = 2, where a
    parallel ParaLSTM solve costs about four times a ParaGRU one per state entry), d for dense.

    Args:
        B: batch size.
        d: state size.
        structure: the cell's Jacobian structure (or its name).

    Returns:
        ``B·d·w``.
    """
    structure = as_structure(structure, d)
    k = structure.width(d)
    if isinstance(structure, Dense):
        return B * d * max(k, AUTO_MIN_WIDTH)
    return B * d * AUTO_MIN_WIDTH * k * k


# The CPU rule's limits on the work per step (step_work), and the shortest T worth Newton's fixed cost: set by
# benchmarks/bench_auto.py on an AMD EPYC and an Intel Xeon VM (see choose_mode).
AUTO_WORK_TRAINING = 8192
AUTO_WORK_INFERENCE = 1024
AUTO_WORK_TRAINING_COMPILED = 32768  # with compile_cell
AUTO_WORK_INFERENCE_COMPILED = 4096
AUTO_MIN_T = 64
AUTO_MIN_WIDTH = 8


