"""Calibration of `mode="auto"` on CPU: the loop, the parallel solve (eager and compiled) and what `mode="auto"` picks.

`pararnn.choose_mode` compares the work per time step, ``B·d·w`` (``pararnn.solver.mode.step_work``:
w = 8 for diagonal Jacobians, 8·k² for k×k blocks, d for dense cells), with one limit for training and one for inference, and another
pair when ``compile_cell`` is on. This script measures where the parallel solve stops winning:
for each case (a cell, B, T, d) the strong loop (a loop over ``u.unbind(1)``), the eager parallel
solve and the compiled one (``compile_cell=True``), forward and forward+backward (gradients of the
parameters), every method of a case timed in turn, round by round (medians), and prints what
``choose_mode`` picks for each. Cases: ParaGRU (diagonal) at d = 64 and d = 256 over a range of
batch sizes, ParaLSTM (Block(2)) and the dense GRU.

``--grid`` instead judges the rule itself, with the module's defaults, on B in (1, 8, 32), T in
(256, 4096, 16384) and state size d in (32, 128, 512) (cases above ``GRID_MAX_ELEMENTS`` state
elements B·T·d left out) for ParaGRU, ParaLSTM and a user's cell written with ``step`` only. Per
case it times the strong loop, ``RNN(cell, mode="sequential")`` and ``RNN(cell,
mode="parallel")``, forward (no grad) and forward+backward, interleaved (each the fastest of its
``--repeats`` rounds: on a shared VM the same loop varied by 30 % between rounds), and runs ``RNN(cell,
mode="auto")`` once each way to see what it takes (``last_info.mode``). The "regret" is the time
of what auto took over the faster of the two modules (1.00: it took the faster), so the module's
own overheads count once, on both sides; the table also gives each module against the strong loop.
``--resume`` keeps the rows already in ``--out`` and runs the rest (a run interrupted loses at most
its current case).

Usage: python benchmarks/bench_auto.py [--threads 1] [--T 2048] [--repeats 5]
       [--quick | --grid [--resume] [--cells ...] [--work ...]]
       [--out results/bench_auto_1thread.json]
Writes the JSON (version, commit, machine, settings) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

CASES = ([("paragru", B, 64) for B in (1, 4, 8, 16, 32, 64)] + [("paragru", B, 256) for B in (2, 4, 8, 16)]
         + [("paralstm", B, 64) for B in (1, 4, 16)] + [("gru", B, 32) for B in (1, 4)] + [("gru", 1, 64)])
QUICK = [("paragru", 1, 64), ("paragru", 16, 64), ("paralstm", 4, 64), ("gru", 1, 32)]
GRID_MAX_ELEMENTS = 1 << 24  # B·T·d: the largest grid cases take about a minute each at 3 repeats
GRID_CELLS = ("paragru", "paralstm", "step_only")
GRID = [(name, B, d, T) for name in GRID_CELLS for B in (1, 8, 32)
        for d in (32, 128, 512) for T in (256, 4096, 16384) if B * T * d <= GRID_MAX_ELEMENTS]


def grid_work(name: str, B: int, d: int) -> int:
    """The work per step (``step_work``) of the grid case ``name`` at ``B``, state size ``d``: as
    its row's head reports it (:func:`_head`), from the cell's own state size and structure."""
    return _head(name, B, 0, make(name, d))["work"]


def make(name: str, d: int):
    """The cell ``name`` (a zoo name or ``"step_only"``) with state size ``d``."""
    if name == "step_only":
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_default", os.path.join(os.path.dirname(__file__),
                                                                                  "bench_default.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.StepOnlyGRU(d, d)
    from pararnn.models import ParaLSTM, make_cell

    if name == "paralstm":  # its state is (c, h): 2·hidden
        return ParaLSTM(d, d // 2)
    return make_cell(name, d)  # input size d; state size cell.state_size


def _head(name: str, B: int, T: int, cell) -> dict:
    """A row's case: the cell's name, B, T, state size, structure and work per step."""
    from pararnn.solver.mode import step_work

    ds, structure = cell.state_size, cell.get_structure()
    return {"cell": name, "B": B, "T": T, "d": ds, "structure": str(structure), "work": step_work(B, ds, structure)}


def case(name: str, B: int, T: int, d: int, repeats: int) -> dict:
    """One row: medians (s) of the loop, eager and compiled parallel, fwd and fwd+bwd, and auto's picks."""
    import pararnn
    from pararnn_studies.bench import strong_loop, time_methods

    torch.manual_seed(0)
    cell = make(name, d)
    x = torch.randn(B, T, d)
    ds = cell.state_size
    eager = pararnn.RNN(cell, mode="parallel", compile_cell=False)
    comp = pararnn.RNN(cell, mode="parallel", compile_cell=True)
    default = pararnn.RNN(cell, mode="parallel")  # compile_cell="auto"
    auto = pararnn.RNN(cell, mode="auto")
    params = list(cell.parameters())
    methods = {"loop": (lambda x: strong_loop(cell, x), params), "parallel": (lambda x: eager(x)[0], params),
               "compile_cell": (lambda x: comp(x)[0], params), "default": (lambda x: default(x)[0], params),
               "auto": (lambda x: auto(x)[0], params)}
    row = {**_head(name, B, T, cell), **time_methods(methods, x, repeats)}
    for bw in ("fwd", "fwdbwd"):  # mode="auto" against the faster of what it chooses between
        row[f"regret_{bw}"] = row[f"auto_{bw}_s"] / min(row[f"loop_{bw}_s"], row[f"default_{bw}_s"])
    for training in (True, False):  # what auto picks with the default compile decision
        cc = pararnn.solver.compile.use_compiled("auto", cell, torch.zeros(B, ds), B, T)
        row[f"pick_{'train' if training else 'infer'}"] = pararnn.choose_mode(
            B, T, ds, x.device, cell.get_structure(), training, compile_cell=cc)
    return row


def grid_case(name: str, B: int, T: int, d: int, repeats: int) -> dict:
    """One grid row: the fastest rounds (s) of the strong loop and the sequential and parallel
    modules (fwd, fwd+bwd), what ``mode="auto"`` took for training and inference, and its regret
    each way."""
    import pararnn
    from pararnn_studies.bench import strong_loop, time_methods

    torch.manual_seed(0)
    cell = make(name, d)
    x = torch.randn(B, T, d)  # input size d; state size cell.state_size (= d)
    params = list(cell.parameters())
    modules = {m: pararnn.RNN(cell, mode=m) for m in ("sequential", "parallel", "auto")}
    methods = {"loop": (lambda x: strong_loop(cell, x), params),
               "sequential": (lambda x: modules["sequential"](x)[0], params),
               "parallel": (lambda x: modules["parallel"](x)[0], params)}
    row = {**_head(name, B, T, cell), **time_methods(methods, x, repeats, statistic=min)}
    torch.autograd.grad(modules["auto"](x)[0].sum(), params)
    picks = {"fwdbwd": modules["auto"].last_info.mode}
    with torch.no_grad():
        modules["auto"](x)
    picks["fwd"] = modules["auto"].last_info.mode
    for bw, pick in picks.items():
        row[f"pick_{bw}"] = pick
        row[f"regret_{bw}"] = row[f"{pick}_{bw}_s"] / min(row[f"sequential_{bw}_s"], row[f"parallel_{bw}_s"])
    return row


def grid_table(rows: list[dict]) -> str:
    """The grid's table, and a line counting the entries within 5 % and 10 %."""
    from pararnn_studies.common import markdown_table

    def vs_loop(r, m):
        return f"{r['loop_fwd_s'] / r[f'{m}_fwd_s']:.2f}× / {r['loop_fwdbwd_s'] / r[f'{m}_fwdbwd_s']:.2f}×"

    body = markdown_table(
        ["cell", "B", "T", "d", "work per step (step_work)", "strong loop fwd / fwd+bwd (ms)",
         "sequential module: speedup", "parallel module: speedup", "auto takes (fwd / fwd+bwd)",
         "auto regret (fwd / fwd+bwd)"],
        [[r["cell"], r["B"], r["T"], r["d"], r["work"], f"{r['loop_fwd_s'] * 1e3:.0f} / {r['loop_fwdbwd_s'] * 1e3:.0f}",
          vs_loop(r, "sequential"), vs_loop(r, "parallel"), f"{r['pick_fwd']} / {r['pick_fwdbwd']}",
          f"{r['regret_fwd']:.2f} / {r['regret_fwdbwd']:.2f}"] for r in rows])
    regrets = [r[f"regret_{bw}"] for r in rows for bw in ("fwd", "fwdbwd")]
    return (body + f"\n\nauto within 5 % of the faster module: {sum(g <= 1.05 for g in regrets)} of {len(regrets)}; "
            f"within 10 %: {sum(g <= 1.10 for g in regrets)}; worst {max(regrets):.2f}×")


def table(rows: list[dict]) -> str:
    from pararnn_studies.common import markdown_table

    def ratio(r, m, bw):
        return r[f"loop_{bw}_s"] / r[f"{m}_{bw}_s"]

    return markdown_table(
        ["cell", "B", "T", "d", "work per step (step_work)", "loop fwd / fwd+bwd (ms)", "eager parallel: speedup",
         "compiled: speedup", "mode='auto': speedup", "auto regret (fwd / fwd+bwd)", "auto picks (train / infer)"],
        [[r["cell"], r["B"], r["T"], r["d"], r["work"], f"{r['loop_fwd_s'] * 1e3:.0f} / {r['loop_fwdbwd_s'] * 1e3:.0f}",
          f"{ratio(r, 'parallel', 'fwd'):.2f}× / {ratio(r, 'parallel', 'fwdbwd'):.2f}×",
          f"{ratio(r, 'compile_cell', 'fwd'):.2f}× / {ratio(r, 'compile_cell', 'fwdbwd'):.2f}×",
          f"{ratio(r, 'auto', 'fwd'):.2f}× / {ratio(r, 'auto', 'fwdbwd'):.2f}×",
          f"{r['regret_fwd']:.2f} / {r['regret_fwdbwd']:.2f}", f"{r['pick_train']} / {r['pick_infer']}"]
         for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="four cases at T = 256 (seconds)")
    ap.add_argument("--grid", action="store_true", help="B (1, 8, 32) × T (256, 4096, 16384) × d (32, 128, 512): "
                    "what mode='auto' takes against the faster module, ParaGRU, ParaLSTM and a step-only cell")
    ap.add_argument("--resume", action="store_true", help="with --grid: keep the rows already in --out")
    ap.add_argument("--cells", default=None, help=f"with --grid: a comma-separated subset of {','.join(GRID_CELLS)}")
    ap.add_argument("--work", default=None, help="with --grid: only the cases of these works per step "
                    "(comma-separated; step_work), e.g. 8192 to check a change of the limits there")
    ap.add_argument("--out", default=None, help="default results/bench_auto_{N}thread(s).json")
    args = ap.parse_args(argv)
    if args.quick:
        args.T = 256
    if args.out is None:
        args.out = f"results/bench_auto_{args.threads}thread{'s' if args.threads > 1 else ''}.json"
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from pararnn_studies.common import ensure_writable, progress_bar, run_metadata, set_threads, write_json_atomic, write_text

    ensure_writable(args.out, "--out")
    set_threads(args.threads)
    saved = None  # the JSON as last written: its rows, and the machine and commit of the run that wrote it
    if args.resume and os.path.isfile(args.out):
        with open(args.out) as f:
            saved = json.load(f)
    rows = saved["rows"] if saved else []
    done = {(r["cell"], r["B"], r["T"]) + ((r["d_arg"],) if "d_arg" in r else ()) for r in rows}
    cases = GRID if args.grid else [(*c, args.T) for c in (QUICK if args.quick else CASES)]
    if args.cells:
        cells = args.cells.split(",")
        if set(cells) - set(GRID_CELLS) or not args.grid:
            raise SystemExit(f"bench_auto: --cells takes a subset of {','.join(GRID_CELLS)} with --grid, got {args.cells!r}")
        cases = [c for c in cases if c[0] in cells]
    if args.work:
        try:
            works = {int(w) for w in args.work.split(",")}
        except ValueError:
            raise SystemExit(f"bench_auto: --work takes comma-separated integers, got {args.work!r}") from None
        if not args.grid:
            raise SystemExit("bench_auto: --work selects grid cases; use it with --grid")
        cases = [c for c in cases if grid_work(*c[:3]) in works]
    units = "seconds (fastest of the interleaved rounds)" if args.grid else "seconds (median)"
    for name, B, d, T in progress_bar(cases, desc="cases", unit="case"):
        if (name, B, T, d) in done:
            continue
        row = (grid_case if args.grid else case)(name, B, T, d, args.repeats)
        rows.append({**row, "d_arg": d})
        saved = {**run_metadata(vars(args)), "units": units, "rows": rows}
        write_json_atomic(args.out, saved)
    md = (grid_table if args.grid else table)(rows)
    if saved:  # the head of the table
        m = saved["machine"]
        title = "mode='auto' on a grid" if args.grid else "mode='auto' calibration"
        md = (f"# {title}: {m['cpu']}, {m['torch_threads']} thread(s), torch {m['torch']}, commit {saved['commit']}; "
              f"{saved['units']}\n\n{md}")
    write_text(os.path.splitext(args.out)[0] + ".md", md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
