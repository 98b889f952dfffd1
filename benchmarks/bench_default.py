"""What a new user gets: the default ``RNN(cell)`` against the strong sequential loop, for a cell
written with ``step`` only (Jacobian by autodiff) and for the zoo's ParaGRU (hand-written Jacobian)
and, with ``--cells``, ParaLSTM.

Per shape, one process, methods interleaved round by round at equal threads: the strong loop
(``u.unbind(1)``), ``RNN(cell)`` (the default: parallel, evaluation compiled where
``compile_cell="auto"`` says so), ``RNN(cell, compile_cell=False)`` (the eager twin) and
``RNN(cell, mode="auto")``; forward (no grad) and forward+backward (gradients of the parameters).
The first call of each compiled solve (the one-off compilation) is timed apart.

    python benchmarks/bench_default.py --threads 1 --out results/bench_default_xeon_1thread.json
"""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import pararnn
from pararnn.models import ParaGRU, ParaLSTM

SHAPES = [(1, 16384, 64), (1, 4096, 64), (8, 4096, 256), (8, 1024, 256)]


class StepOnlyGRU(pararnn.Cell):
    """A diagonal GRU-like cell as a user writes it: ``prepare`` and ``step``, nothing else."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.state_size, self.input_size = d, d_in
        self.inp = nn.Linear(d_in, 3 * d)
        self.a = nn.Parameter(torch.rand(3, d) - 0.5)

    def prepare(self, x):  # [B, T, d_in] -> [B, T, 3d]
        return self.inp(x)

    def step(self, h, u):  # h [N, d], u [N, 3d] -> [N, d]
        uz, ur, uc = u.chunk(3, -1)
        z = torch.sigmoid(uz + self.a[0] * h)
        r = torch.sigmoid(ur + self.a[1] * h)
        c = torch.tanh(uc + self.a[2] * r * h)
        return (1 - z) * h + z * c


CELLS = {"step_only": StepOnlyGRU, "paragru": ParaGRU, "paralstm": ParaLSTM}  # d: the hidden size


def bench_shape(name: str, B: int, T: int, d: int, repeats: int) -> dict:
    from pararnn_studies.bench import compile_time, strong_loop, time_methods

    torch.manual_seed(0)
    cell = CELLS[name](d, d)
    x = torch.randn(B, T, d)
    params = list(cell.parameters())
    default, eager, auto = pararnn.RNN(cell), pararnn.RNN(cell, compile_cell=False), pararnn.RNN(cell, mode="auto")
    row = {"cell": name, "B": B, "T": T, "d": d, "first_call_s": compile_time(default, x, cell)}
    with torch.no_grad():
        y, _, info = default(x, return_info=True)
        row["newton_iterations"] = info.iterations
        row["compiled"] = pararnn.solver.compile.use_compiled("auto", cell, y[:, 0], B, T)
        row["max_abs_err_vs_loop"] = float((y - strong_loop(cell, x)).abs().max())
    methods = {"strong_loop": (lambda x: strong_loop(cell, x), params),
               "default": (lambda x: default(x)[0], params),
               "eager": (lambda x: eager(x)[0], params),
               "auto": (lambda x: auto(x)[0], params)}
    row.update(time_methods(methods, x, repeats, log=f"{name} B={B} T={T} d={d}"))
    for m in ("default", "eager", "auto"):
        for bw in ("fwd", "fwdbwd"):
            row[f"speedup_{m}_{bw}"] = row[f"strong_loop_{bw}_s"] / row[f"{m}_{bw}_s"]
    return row


def markdown(res: dict) -> str:
    from pararnn_studies.common import markdown_table

    m = res["machine"]
    head = (f"# The default RNN(cell) against the strong loop: {m['cpu']}, {res['settings']['threads']} "
            f"thread(s), torch {m.get('torch')}, commit {res['commit']}\n\nms, forward / forward+backward; "
            "speedups against the strong loop; first call = compile + first run (s)\n")
    rows = [[r["cell"], r["B"], r["T"], r["d"], r["newton_iterations"],
             *(f"{r[f'{k}_fwd_s'] * 1e3:.1f} / {r[f'{k}_fwdbwd_s'] * 1e3:.1f}" for k in
               ("strong_loop", "default", "eager", "auto")),
             *(f"{r[f'speedup_{k}_fwd']:.2f}× / {r[f'speedup_{k}_fwdbwd']:.2f}×" for k in ("default", "eager", "auto")),
             f"{r['first_call_s']:.1f}"] for r in res["rows"]]
    return head + "\n" + markdown_table(
        ["cell", "B", "T", "d", "iters", "strong loop", "RNN(cell)", "compile_cell=False", "mode='auto'",
         "RNN(cell) vs loop", "eager vs loop", "auto vs loop", "first call (s)"], rows)


def main(argv=None) -> dict:
    from pararnn_studies.common import ensure_writable, progress_bar, run_metadata, set_threads, write_json_atomic, write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cells", default="step_only,paragru", help=f"comma-separated, from {', '.join(CELLS)}")
    ap.add_argument("--shapes", default=None, help="B:T:d,... (default: the four regimes)")
    ap.add_argument("--out", default="results/bench_default.json")
    args = ap.parse_args(argv)
    cells = args.cells.split(",")
    if not cells or set(cells) - set(CELLS):
        raise SystemExit(f"bench_default: --cells must name some of {', '.join(CELLS)}, got {args.cells!r}")
    ensure_writable(args.out, "--out")
    set_threads(args.threads)
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    res = run_metadata({"threads": args.threads, "repeats": args.repeats, "cells": args.cells, "shapes": shapes})
    res["rows"] = []
    for name, (B, T, d) in progress_bar([(c, s) for c in cells for s in shapes], desc="bench default"):
        res["rows"].append(bench_shape(name, B, T, d, args.repeats))
        write_json_atomic(args.out, res)  # each row kept as it ends
    write_text(os.path.splitext(args.out)[0] + ".md", markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
