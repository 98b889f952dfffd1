"""Why Newton is slow on large recurrent weights: per-channel convergence and the speed of its front.

Plain Newton (exact Jacobians, no clipping, no fallback; a non-finite entry of an update keeps
the previous iterate) on the ParaGRU-like sweep of benchmarks/bench_convergence.py (B = 4,
d = 64, T = 4096), in float64 and float32, for up to --max-iters steps. For a diagonal cell each
(sequence, channel) pair is an independent scalar recurrence, so the script records, per Newton
step, how many of the B·d pairs have converged (|r_t| <= tol at every t) and the front: the first
position (min over the batch) where some channel is not yet converged. Newton makes at least one
more position exact per step; this measures how many more it makes in practice.

Usage: python benchmarks/bench_newton_front.py [--max-iters 300] [--out results/bench_newton_front.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def plain_newton(cell, u: torch.Tensor, dtype: torch.dtype, max_iters: int, tol: float) -> dict:
    from pararnn.solver.evaluate import evaluate, initial_guess
    from pararnn.solver.options import SolverOptions
    from pararnn.scan import linear_scan

    structure = cell.get_structure()
    B, T = u.shape[:2]
    d = cell.state_size
    S = torch.zeros(B, T + 1, d, dtype=dtype)  # (h0 = 0, h_1..h_T)
    r = torch.empty(B, T, d, dtype=dtype)
    J = torch.empty(B, T, *structure.storage_shape(d), dtype=dtype)
    initial_guess(cell, u, S[:, 0], SolverOptions(), S[:, 1:])
    fronts, pairs = [], []
    for it in range(max_iters + 1):
        evaluate(cell, S, u, r, J, 1 << 18, 0.0, structure)
        bad = ~(r.abs() <= tol)  # [B, T, d]; NaN counts as bad
        bad_t = bad.any(-1)  # [B, T]
        front = torch.where(bad_t.any(1), bad_t.float().argmax(1), torch.full((B,), T)).min()
        fronts.append(int(front))
        pairs.append(int((~bad.any(1)).sum()))
        if int(front) == T or it == max_iters:
            break
        new = S[:, 1:] + linear_scan(J, r, structure=structure)
        S[:, 1:] = torch.where(torch.isfinite(new), new, S[:, 1:])
    return {"iterations": it, "converged": fronts[-1] == T, "front": fronts, "converged_pairs": pairs,
            "H": S[:, 1:].clone()}


def one_case(a_std: float, dtype: torch.dtype, B: int, T: int, d: int, max_iters: int) -> dict:
    from bench_convergence import _cell

    import pararnn

    cell = _cell("paragru", a_std, d, seed=0)
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pararnn.RNN(cell.double(), mode="sequential")(x.double())[0]
        cell.to(dtype)
        u = cell.prepare(x.to(dtype))
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        out = plain_newton(cell, u, dtype, max_iters, tol)
    H = out.pop("H")
    n10 = min(10, len(out["converged_pairs"]) - 1)
    fr = out["front"]
    late = [fr[i + 1] - fr[i] for i in range(min(20, len(fr) - 1), len(fr) - 1)]
    return {"a_std": a_std, "dtype": str(dtype).replace("torch.", ""), "B": B, "T": T, "d": d, **out,
            "pairs": B * d, "converged_pairs_after_10": out["converged_pairs"][n10],
            "front_after_10": fr[n10], "front_after_30": fr[min(30, len(fr) - 1)],
            "front_speed_after_20": (sum(late) / len(late)) if late else None,
            "rel_err": ((H.double() - ref).abs().max() / ref.abs().max()).item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/bench_newton_front.json")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.join(here, "..")]
    from tqdm import tqdm

    from pararnn_studies.common import (
        ensure_writable,
        markdown_table,
        run_metadata,
        set_threads,
        write_json_atomic,
        write_text,
    )

    ensure_writable(args.out, "--out")
    set_threads(args.threads)
    B, T, d = 4, 4096, 64
    cases = [(a, dt) for a in (0.5, 1.0, 1.5, 2.0) for dt in (torch.float64, torch.float32)]
    rows = []
    for a, dt in tqdm(cases, desc="newton front", unit="case"):
        rows.append(one_case(a, dt, B, T, d, args.max_iters))
        write_json_atomic(args.out, {**run_metadata({**vars(args), "B": B, "T": T, "d": d}), "rows": rows})  # each case kept
    md = markdown_table(
        ["a_std", "dtype", "Newton steps", "converged", "pairs converged after 10 steps", "front after 10",
         "front after 30", "front speed after step 20 (positions/step)", "error vs fp64 loop"],
        [[r["a_std"], r["dtype"], r["iterations"], "yes" if r["converged"] else "no",
          f"{r['converged_pairs_after_10']}/{r['pairs']}", r["front_after_10"], r["front_after_30"],
          "-" if r["front_speed_after_20"] is None else f"{r['front_speed_after_20']:.1f}",
          f"{r['rel_err']:.1e}"] for r in rows])
    write_text(os.path.splitext(args.out)[0] + ".md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
