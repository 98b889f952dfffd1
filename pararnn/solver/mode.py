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
      16384 and 2048 (dense cells keep the eager limits: their cost is the d×d Jacobians and
      scan, not the elementwise evaluation). T < 64 stays sequential.

    Calibration (benchmarks/bench_auto.py, T = 2048, AMD EPYC VM, results/bench_auto_*): the
    eager training step beats the loop up to work 16384 for ParaGRU (1.08-1.09× there at 1
    thread) but ParaLSTM (jvp Jacobian) loses there (0.51×), hence 8192; the eager forward wins at
    2048 (ParaGRU 1.57×) and loses at 4096 (0.95-0.98×), hence 1024. Compiled, the training step
    wins at 16384 for ParaGRU (1.59-2.11× at 1 thread, 2.47-3.10× at 2) and ParaLSTM at 2 threads
    (1.51×), not at 1 (0.75×); the forward wins at 2048 (ParaGRU 3.36×, 4.43× at 2 threads) and at
    4096-8192 only for ParaGRU (1.13-2.04×; ParaLSTM 0.56× at 4096, 1 thread). The rule sees
    neither the thread count nor whether the Jacobian is hand-written: it leaves wins on the table
    (compiled ParaGRU forward at 4096-8192; at 16384 it ties at 2 threads, 0.99-1.08×).
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


# The CPU auto rule's constants, calibrated on `pararnn bench` (docs/convergence.md, "Choosing a mode"): the
# parallel fwd+bwd beat the strong loop up to B·d·k ≈ 8192 and the forward alone up to ≈ 1024;
# below T = 64 the loop's few steps cost less than Newton's fixed overhead; a diagonal cell's
# evaluation costs about 8 elementwise ops per entry, so it counts as k = 8.
AUTO_WORK_TRAINING = 8192
AUTO_WORK_INFERENCE = 1024
AUTO_WORK_TRAINING_COMPILED = 16384  # with compile_cell: see choose_mode's calibration
AUTO_WORK_INFERENCE_COMPILED = 2048
AUTO_MIN_T = 64
AUTO_MIN_WIDTH = 8


