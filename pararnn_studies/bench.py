"""Engine speed: parallel Newton vs the strong/weak sequential loops, nn.GRU and the memory floor.

Usage (``pararnn bench`` or ``python benchmarks/bench_engine.py``; the options are in cli.py):
    pararnn bench            # the latency and bandwidth regimes and the zoo, ~15 min on 2 cores
    pararnn bench --quick    # small shapes, about a minute
Writes results/bench_engine.json (version, commit, date, machine, settings) and prints markdown tables.
All ratios come from one run: the machines are noisy, so compare within a run only.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch

import pararnn
from pararnn.kernels.dispatch import scan_dispatch
from pararnn.models import CELLS, make_cell
from pararnn.models.paragru import ParaGRU
from pararnn.solver.fallback import sequential_solve
from pararnn.structure import Diagonal
from pararnn.utils.timing import copy_bandwidth, interleaved_medians, median_time

from .common import ensure_writable, figure, markdown_table, progress_bar, run_metadata, set_threads, write_json_atomic, write_text


@functools.cache
def autodiff_twin(cell_class: type) -> type:
    """``cell_class`` with its Jacobian left to autodiff, as a user's cell written with ``step`` only.
    One class per ``cell_class`` (cached): compiled evaluations are cached per class, so a new class
    per call would compile again."""
    return type(f"{cell_class.__name__}Jvp", (cell_class,), {
        "__doc__": f"{cell_class.__name__} with its Jacobian left to autodiff.",
        "step_and_jacobian": pararnn.Cell.step_and_jacobian,
        "step_jacobian_and_scale": pararnn.Cell.step_jacobian_and_scale})


ParaGRUJvp = autodiff_twin(ParaGRU)


def weak_loop(cell, x):
    """The weak baseline: slice u[:, t] each step (its backward costs O(B T^2 d))."""
    u = cell.prepare(x)
    h = cell.initial_state(x.shape[0], cell.state_dtype(u), x.device)
    out = []
    for t in range(u.shape[1]):
        h = cell.step(h, u[:, t])
        out.append(h)
    return cell.output(torch.stack(out, 1), x)


def strong_loop(cell, x):
    """The strong baseline: a loop over u.unbind(1) (linear-time backward)."""
    u = cell.prepare(x)
    h0 = cell.initial_state(x.shape[0], cell.state_dtype(u), x.device)
    return cell.output(sequential_solve(cell.step, u, h0), x)


def timed_call(fn, x, params, backward):
    """One call of ``fn(x)``: forward under no_grad, or forward and the gradients of ``params``."""
    def run():
        if backward:
            y = fn(x)
            torch.autograd.grad(y.sum(), params, allow_unused=True)
        else:
            with torch.no_grad():
                fn(x)

    return run


def solve_check(par, seq, x) -> dict:
    """Newton iterations of the parallel solve and its max abs error against the sequential one."""
    with torch.no_grad():
        info = par.solve_info(x)
        err = (par(x)[0] - seq(x)[0]).abs().max().item()
    return {"newton_iterations": info.iterations, "max_abs_err_vs_sequential": err}


def time_methods(methods, x, repeats, skip_backward=(), log=None, statistic=statistics.median) -> dict:
    """``{name}_fwd_s`` and ``{name}_fwdbwd_s`` medians (or another ``statistic`` of the rounds) for
    every ``name: (fn, params)``, all of them run in turn, round by round (after one untimed round),
    so machine noise hits every method alike and the ratios of one run compare like with like.

    Methods in ``skip_backward`` (the slicing loop, whose backward costs O(B T^2 d)) get None
    for fwd+bwd: skipped, not measured.
    """
    calls = {f"{name}_{'fwdbwd' if bw else 'fwd'}_s": timed_call(fn, x, params, bw)
             for name, (fn, params) in methods.items() for bw in (False, True)
             if not (bw and name in skip_backward)}
    out = {f"{name}_fwdbwd_s": None for name in methods if name in skip_backward}
    out.update(interleaved_medians(calls, repeats=repeats, warmup=1, statistic=statistic))
    if log:
        for key, t in out.items():
            if t is not None:
                print(f"  {log} {key}: {t * 1e3:.1f} ms", file=sys.stderr)
    return out


def bench_regime(B, T, d, repeats, weak_max_work=8 * 1024 * 1024 * 256):
    """Time every method on one shape; returns a dict row (seconds, medians)."""
    torch.manual_seed(0)
    x = torch.randn(B, T, d)
    cell = ParaGRU(d, d)
    cell_jvp = ParaGRUJvp(d, d)
    cell_jvp.load_state_dict(cell.state_dict())
    gru = torch.nn.GRU(d, d, batch_first=True)
    par = pararnn.RNN(cell, mode="parallel")
    par_jvp = pararnn.RNN(cell_jvp, mode="parallel")
    seq = pararnn.RNN(cell, mode="sequential")
    compiled = torch.compile(par)
    par_eager = pararnn.RNN(cell, mode="parallel", compile_cell=False)

    def bf16(x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return par(x)[0]

    methods = {
        "strong_loop": (lambda x: strong_loop(cell, x), list(cell.parameters())),
        "weak_loop": (lambda x: weak_loop(cell, x), list(cell.parameters())),
        "sequential": (lambda x: seq(x)[0], list(cell.parameters())),
        "parallel": (lambda x: par(x)[0], list(cell.parameters())),
        "parallel_compiled": (lambda x: compiled(x)[0], list(cell.parameters())),
        "parallel_eager": (lambda x: par_eager(x)[0], list(cell.parameters())),
        "parallel_bf16": (bf16, list(cell.parameters())),
        "parallel_jvp": (lambda x: par_jvp(x)[0], list(cell_jvp.parameters())),
        "torch_gru": (lambda x: gru(x)[0], list(gru.parameters())),
    }
    row = {"B": B, "T": T, "d": d, **solve_check(par, seq, x), "compile_s": compile_time(compiled, x, cell),
           "compile_cell_s": compile_time(par, x, cell)}
    slow = {"weak_loop"} if B * T * T * d > weak_max_work else set()
    row.update(time_methods(methods, x, repeats, slow, log=f"B={B} T={T} d={d}"))
    for bw in ("fwd", "fwdbwd"):
        row[f"speedup_parallel_vs_strong_{bw}"] = row[f"strong_loop_{bw}_s"] / row[f"parallel_{bw}_s"]
        row[f"speedup_eager_vs_strong_{bw}"] = row[f"strong_loop_{bw}_s"] / row[f"parallel_eager_{bw}_s"]
    return row


def compile_time(compiled, x, cell) -> float:
    """Seconds of the first call of a ``torch.compile``d module (or of an RNN whose cell evaluation
    compiles), forward and backward (the one-off compilation; later calls are timed like every
    other method)."""
    t0 = time.perf_counter()
    torch.autograd.grad(compiled(x)[0].sum(), list(cell.parameters()))
    with torch.no_grad():
        compiled(x)
    return time.perf_counter() - t0


def torch_twin(cell):
    """torch.nn.GRU/LSTM with the cell's weights, when the cell has such a twin."""
    to_torch = getattr(cell, "to_torch", None)
    if to_torch is None or getattr(cell, "heads", 1) != 1:
        return None
    return to_torch()


def bench_cells(names, shapes, repeats, device="cpu", weak_max_work=8 * 1024 * 1024 * 256, rows=None,
                on_row=None):
    """Every named cell on every (B, T, d): the naive (slicing) loop, mode="sequential",
    mode="parallel" and the torch twin, forward and forward+backward (median seconds).
    Rows are appended to ``rows`` (a new list if None), and ``on_row()`` is called after each."""
    rows = [] if rows is None else rows
    jobs = [(n, s) for n in names for s in shapes]
    for name, (B, T, d) in progress_bar(jobs, desc="bench cells", unit="case"):
        torch.manual_seed(0)
        cell = make_cell(name, d).to(device)
        x = torch.randn(B, T, d, device=device)
        par, seq = pararnn.RNN(cell, mode="parallel"), pararnn.RNN(cell, mode="sequential")
        row = {"cell": name, "structure": str(cell.get_structure()), "B": B, "T": T, "d": d, "device": str(device),
               **solve_check(par, seq, x), "lyapunov": pararnn.diagnose(cell, x, max_steps=1024, solve=False).lyapunov}
        methods = {"naive": (lambda x: weak_loop(cell, x), list(cell.parameters())),
                   "sequential": (lambda x: seq(x)[0], list(cell.parameters())),
                   "parallel": (lambda x: par(x)[0], list(cell.parameters()))}
        twin = torch_twin(cell)
        if twin is not None:
            methods["torch"] = (lambda x: twin(x)[0], list(twin.parameters()))
        row.update(time_methods(methods, x, repeats, {"naive"} if B * T * T * d > weak_max_work else set()))
        for bw in ("fwd", "fwdbwd"):
            row[f"speedup_{bw}"] = row[f"sequential_{bw}_s"] / row[f"parallel_{bw}_s"]
        rows.append(row)
        if on_row is not None:
            on_row()
    return rows


def _loglog(path, title, ylabel, series, hline=None):
    """One log-log plot of ``series``: (xs, ys, linestyle, color, label) tuples."""
    with figure(path) as ax:
        for xs, ys, ls, color, label in series:
            ax.plot(xs, ys, ls, marker="o", color=color, label=label)
        if hline is not None:
            ax.axhline(hline, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    return path


def plot_cells(rows, out_prefix):
    """Speedup of parallel over sequential against T (log-log), and time per token."""
    colors = [f"C{i}" for i in range(10)]
    groups = {}
    for r in rows:
        groups.setdefault((r["cell"], r["B"], r["d"]), []).append(r)
    speed, per_token = [], []
    for i, ((cell, B, d), rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["T"])
        Ts = [r["T"] for r in rs]
        for bw, ls in (("fwd", "--"), ("fwdbwd", "-")):
            speed.append((Ts, [r[f"speedup_{bw}"] for r in rs], ls, colors[i % 10],
                          f"{cell} B={B} d={d} ({'fwd+bwd' if bw == 'fwdbwd' else 'fwd'})"))
        for m, ls in (("parallel", "-"), ("sequential", ":")):
            per_token.append((Ts, [r[f"{m}_fwdbwd_s"] / (r["T"] * r["B"]) * 1e6 for r in rs], ls,
                              colors[i % 10], f"{cell} {m}"))
    dev = rows[0]["device"]
    return [_loglog(out_prefix + "_speedup.png", f"parallel vs sequential ({dev})",
                    "speedup (sequential / parallel)", speed, hline=1.0),
            _loglog(out_prefix + "_time_per_token.png", f"time per token ({dev})",
                    "fwd+bwd time per token (µs)", per_token)]


def _ms_pair(r, method):
    """``"fwd / fwd+bwd"`` in ms for one method of a row ("–" where not measured)."""
    ms = lambda k: "–" if r.get(k) is None else f"{r[k] * 1e3:.0f}"  # noqa: E731
    return f"{ms(method + '_fwd_s')} / {ms(method + '_fwdbwd_s')}"


def cells_table(rows):
    """Markdown table of the per-cell rows (ms, fwd / fwd+bwd)."""
    header = ["cell", "structure", "B", "T", "d", "Lyapunov λ", "iters", "max err", "naive loop", "sequential",
              "**parallel**", "torch twin", "speedup"]
    return markdown_table(header, [
        [r["cell"], r["structure"], r["B"], r["T"], r["d"], f"{r['lyapunov']:.2f}", r["newton_iterations"],
         f"{r['max_abs_err_vs_sequential']:.1e}", *[_ms_pair(r, m) for m in ("naive", "sequential", "parallel", "torch")],
         f"{r['speedup_fwd']:.2f}× / {r['speedup_fwdbwd']:.2f}×"] for r in rows])


def bench_scan_floor(shapes, repeats):
    """The diagonal linear_scan against bytes moved / measured copy bandwidth."""
    rows = []
    for B, T, d in shapes:
        A = torch.rand(B, T, d)
        b = torch.randn(B, T, d)
        out = torch.empty_like(b)
        t = median_time(lambda: scan_dispatch(A, b, None, Diagonal(), out=out), repeats=repeats, warmup=2)
        t_ref = median_time(lambda: scan_dispatch(A, b, None, Diagonal(), backend="reference"), repeats=2)
        nbytes = 3 * A.numel() * A.element_size()  # read A, b; write h
        bw = copy_bandwidth(nbytes)
        floor = nbytes / bw
        rows.append({"B": B, "T": T, "d": d, "scan_s": t, "reference_loop_s": t_ref, "floor_s": floor,
                     "ratio_to_floor": t / floor,
                     "scan_GBps": nbytes / t / 1e9, "copy_GBps": bw / 1e9})
        print(f"  scan B={B} T={T} d={d}: {t * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms", file=sys.stderr)
    return rows


def table(rows):
    """Markdown table of the regime rows (ms, fwd / fwd+bwd)."""
    header = ["B", "T", "d", "iters", "strong loop", "sequential", "**parallel**", "parallel, compile_cell=False",
              "parallel, torch.compile", "parallel, bf16 autocast", "parallel (autodiff J)", "torch.nn.GRU",
              "weak loop", "parallel speedup vs strong", "eager speedup vs strong",
              "torch.compile / first call (s, once)"]
    methods = ("strong_loop", "sequential", "parallel", "parallel_eager", "parallel_compiled", "parallel_bf16",
               "parallel_jvp", "torch_gru", "weak_loop")
    return markdown_table(header, [
        [r["B"], r["T"], r["d"], r["newton_iterations"], *[_ms_pair(r, m) for m in methods],
         f"{r['speedup_parallel_vs_strong_fwd']:.2f}× / {r['speedup_parallel_vs_strong_fwdbwd']:.2f}×",
         f"{r['speedup_eager_vs_strong_fwd']:.2f}× / {r['speedup_eager_vs_strong_fwdbwd']:.2f}×",
         f"{r['compile_s']:.1f} / {r['compile_cell_s']:.1f}"] for r in rows])


def run(args: argparse.Namespace) -> dict:
    """Run the engine benchmark; returns the results dict (also written to ``args.out``)."""
    started = time.perf_counter()
    if args.threads < 1 or args.repeats < 1:
        raise SystemExit("pararnn bench: --threads and --repeats must be >= 1")
    cells = [c.strip().lower() for c in args.cells.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS]
    if bad:
        raise SystemExit(f"pararnn bench: unknown cell(s) {bad}; choose from {', '.join(CELLS)}")
    if args.quick:
        regimes = {"latency": [(1, 1024, 64)], "bandwidth": [(8, 256, 256)]}
        scan_shapes = [(1, 4096, 64), (8, 1024, 256)]
        Ts, width = [256, 1024], 32
    else:
        regimes = {"latency": [(1, 4096, 64), (1, 16384, 64)], "bandwidth": [(8, 1024, 256), (8, 4096, 256)]}
        scan_shapes = [(1, 16384, 64), (8, 4096, 256), (8, 16384, 256)]
        Ts, width = [1024, 4096, 16384], 64
    try:
        Ts = [int(t) for t in args.Ts.split(",")] if args.Ts else Ts
    except ValueError:
        raise SystemExit(f"pararnn bench: --Ts must be integers, got {args.Ts!r}")
    width = args.width or width
    if min(Ts) < 1 or width < 1 or args.batch < 1:
        raise SystemExit("pararnn bench: --Ts, --width and --batch must be >= 1")
    cell_shapes = [(args.batch, T, width) for T in Ts]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ensure_writable(args.out, "--out")
    set_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings.update(Ts=Ts, width=width, cells=cells, regimes=regimes if args.engine else {},
                    scan_shapes=scan_shapes if args.engine else [], device=device)
    result = {**run_metadata(settings), "engine_cell": "ParaGRU (diagonal GRU-like)",
              "units": "seconds (median)", "complete": False, "regimes": {}, "scan_vs_floor": None, "cells": []}

    def save(complete: bool = False) -> None:
        """The results so far (an interrupted run keeps every finished measurement)."""
        result["complete"] = complete
        result["elapsed_s"] = time.perf_counter() - started  # the whole run, compiles included
        write_json_atomic(args.out, result)

    if args.engine:
        for name, shapes in regimes.items():
            result["regimes"][name] = []
            for B, T, d in shapes:
                result["regimes"][name].append(bench_regime(B, T, d, args.repeats))
                save()
        result["scan_vs_floor"] = bench_scan_floor(scan_shapes, args.repeats)
        save()
    bench_cells(cells, cell_shapes, args.repeats, device, rows=result["cells"], on_row=save)
    save(complete=True)
    m = result["machine"]
    md = [f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m.get('mem_total_gb')} GB, torch {m['torch']}, "
          f"numba {m['numba']}, {args.threads} torch/numba thread(s). Engine regimes and scan: CPU; "
          f"per-cell study: {device}. Commit {result['commit']}; the run took {result['elapsed_s']:.0f} s.", "",
          "Engine (ParaGRU), times in ms, forward / forward+backward:", "",
          table([r for rows in result["regimes"].values() for r in rows]) if args.engine else "(skipped)", ""]
    if args.engine:
        md += ["| B | T | d | diagonal scan, numba (ms) | PyTorch loop (ms) | memory floor (ms) | numba / floor | numba GB/s |",
               "|---|---|---|---|---|---|---|---|"]
    for r in result["scan_vs_floor"] or []:
        md.append(f"| {r['B']} | {r['T']} | {r['d']} | {r['scan_s'] * 1e3:.2f} | {r['reference_loop_s'] * 1e3:.1f} | "
                  f"{r['floor_s'] * 1e3:.2f} | {r['ratio_to_floor']:.2f}× | {r['scan_GBps']:.1f} |")
    if result["cells"]:
        md += ["", "Per cell, times in ms, forward / forward+backward (speedup = sequential / parallel):", "",
               cells_table(result["cells"])]
    base = os.path.splitext(args.out)[0]
    write_text(base + ".md", "\n".join(md))
    print("\n".join(md))
    if result["cells"]:
        written = [p for p in plot_cells(result["cells"], base) if os.path.isfile(p)]  # none without matplotlib
        if written:
            print("\nplots: " + ", ".join(written))
    print(f"results: {args.out}, {base}.md")
    return result
