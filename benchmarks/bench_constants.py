"""The measurements behind the engine's tuned CPU constants, on the machine at hand.

Each part times the alternatives a constant chooses between, interleaved (one process, equal
threads), and reports which wins where; the constants' comments name this file, and its results
(``results/bench_constants_<cpu>.json`` and ``.md``) hold the numbers and the machine:

- ``COMPILED_CHUNK_FACTOR`` (pararnn/solver/evaluate.py): compiled ParaGRU evaluations with pieces
  of 1, 2, 4 and 8 × ``eval_chunk`` state elements;
- ``ONE_ROW_DIVISOR``: a compiled ParaGRU forward with one sequence per piece against several;
- ``ONEDNN_MIN_MACS`` (pararnn/linear.py): oneDNN's inner product against ``F.linear`` by size;
- the fast tanh (pararnn/fastmath.py) against torch's, compiled;
- ``fusion_pays`` (pararnn/solver/compile.py): ``compile_cell=True`` against ``False`` per cell
  (hand-written diagonal, unshared block (two styles), shared block and dense Jacobians, and an
  autodiff twin).

    python benchmarks/bench_constants.py --threads 1 --out results/bench_constants_xeon.json
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.nn.functional as F

from pararnn import RNN, Block, Cell, fastmath, linear
from pararnn.models import ParaGRU
from pararnn.solver import evaluate as solver_evaluate
from pararnn.utils.timing import interleaved_medians


@contextlib.contextmanager
def _constant(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _compiled_forwards(shapes, name: str, values: dict, repeats: int) -> list[dict]:
    """A compiled ParaGRU forward (no grad) per value of the constant ``name`` of
    pararnn/solver/evaluate.py, interleaved: ms per call, per shape and label of ``values``."""
    rows = []
    for B, T, d in shapes:
        torch.manual_seed(0)
        rnn, x = RNN(ParaGRU(d, d), compile_cell=True), torch.randn(B, T, d)

        def run(value):
            def call():
                with _constant(solver_evaluate, name, value), torch.no_grad():
                    rnn(x)
            return call
        fns = {label: run(value) for label, value in values.items()}
        for fn in fns.values():
            fn()  # compile every kind of piece first
        t = interleaved_medians(fns, repeats=repeats, warmup=1)
        rows.append({"B": B, "T": T, "d": d, "ms": {k: v * 1e3 for k, v in t.items()}})
    return rows


def chunk_factor(shapes, factors=(1, 2, 4, 8), repeats: int = 7) -> list[dict]:
    """Compiled pieces of each factor × eval_chunk state elements (COMPILED_CHUNK_FACTOR)."""
    return _compiled_forwards(shapes, "COMPILED_CHUNK_FACTOR", {f"x{f}": f for f in factors}, repeats)


def one_row(shapes, repeats: int = 7) -> list[dict]:
    """One sequence per compiled piece (ONE_ROW_DIVISOR = 2) against several rows per piece (0: the rule off)."""
    return _compiled_forwards(shapes, "ONE_ROW_DIVISOR", {"one_row": 2, "several_rows": 0}, repeats)


def onednn(rows_list, d_in: int = 64, d_out: int = 192, repeats: int = 9) -> list[dict]:
    """``F.linear`` against oneDNN's inner product (forward), fp32, per number of rows: µs."""
    impl = linear._onednn
    out = []
    for n in rows_list:
        x, w, b = torch.randn(n, d_in), torch.randn(d_out, d_in), torch.randn(d_out)
        fns = {"F.linear": lambda: F.linear(x, w, b)}
        if impl is not None:
            fns["onednn"] = lambda: impl(x, w, b, "none", [], "")
        t = interleaved_medians(fns, repeats=repeats, warmup=2, min_turn_s=0.02)
        out.append({"rows": n, "macs": n * d_in * d_out, "us": {k: v * 1e6 for k, v in t.items()}})
    return out


def tanh(n: int = 1 << 20, repeats: int = 9) -> dict:
    """torch.tanh against fastmath.tanh, each compiled alone, fp32: ms per call of n elements."""
    x = torch.randn(n) * 3
    fns = {"torch.tanh": torch.compile(torch.tanh), "fastmath.tanh": torch.compile(fastmath.tanh)}
    for fn in fns.values():
        fn(x)
    t = interleaved_medians({k: (lambda f=f: f(x)) for k, f in fns.items()}, repeats=repeats, warmup=1,
                            min_turn_s=0.02)
    return {"n": n, "ms": {k: v * 1e3 for k, v in t.items()}}


PARTS = ("chunk_factor", "one_row", "onednn", "tanh", "fusion")
FUSION_CELLS = ("paragru", "paralstm", "paralstm_autodiff", "block_tanh", "deltanet", "gru")


class BlockTanh(Cell):
    """``h' = tanh(R h + u)``, R block-diagonal with 2×2 blocks, and its Jacobian
    ``diag(1 - h'²) R`` written by broadcasting (no stacking of entries): a hand-written block
    Jacobian of another style than ParaLSTM's."""

    structure = Block(2)

    def __init__(self, d: int):
        super().__init__()
        self.state_size = self.input_size = d
        self.R = torch.nn.Parameter(torch.randn(d // 2, 2, 2) * 0.5)

    def step(self, h, u):  # h [N, d], u [N, d] -> [N, d]
        return torch.tanh((self.R @ h.unflatten(-1, (-1, 2, 1))).flatten(-3) + u)

    def step_and_jacobian(self, h, u):
        f = self.step(h, u)
        return f, (1 - f * f).unflatten(-1, (-1, 2, 1)) * self.R  # [N, d/2, 2, 2]


def fusion(cells=FUSION_CELLS, shapes=((1, 4096, 64), (8, 1024, 64)), repeats: int = 5) -> list[dict]:
    """``RNN(cell, mode="parallel")`` with the evaluation compiled and eager, forward (no grad) and
    forward+backward, interleaved: ms per call, per cell and shape (``d`` the cell's width: its
    hidden size), with the compile flag ``compile_cell="auto"`` takes for it."""
    from pararnn.models import ParaLSTM, make_cell
    from pararnn.solver.compile import fusion_pays
    from pararnn_studies.bench import autodiff_twin, time_methods

    rows = []
    for name in cells:
        for B, T, d in shapes:
            torch.manual_seed(0)
            cell = (autodiff_twin(ParaLSTM)(d, d) if name == "paralstm_autodiff" else
                    BlockTanh(d) if name == "block_tanh" else make_cell(name, d))
            x, params = torch.randn(B, T, d), list(cell.parameters())
            rnns = {"compiled": RNN(cell, mode="parallel", compile_cell=True),
                    "eager": RNN(cell, mode="parallel", compile_cell=False)}
            t = time_methods({k: (lambda x, r=r: r(x)[0], params) for k, r in rnns.items()}, x, repeats)
            rows.append({"cell": name, "structure": str(cell.get_structure()), "B": B, "T": T, "d": d,
                         "auto_compiles": fusion_pays(cell), "ms": {k: v * 1e3 for k, v in t.items()}})
    return rows


def markdown(res: dict) -> str:
    from pararnn_studies.common import markdown_table

    m = res["machine"]
    parts = [f"# Constants' measurements: {m['cpu']}, {res['settings']['threads']} thread(s), torch "
             f"{m.get('torch')}, commit {res['commit']}", ""]
    if res.get("chunk_factor"):
        facs = list(res["chunk_factor"][0]["ms"])
        parts += ["## COMPILED_CHUNK_FACTOR: compiled ParaGRU forward, ms", "",
                  markdown_table(["B, T, d", *facs], [[f"{r['B']}, {r['T']}, {r['d']}",
                                                       *(f"{r['ms'][f]:.2f}" for f in facs)]
                                                      for r in res["chunk_factor"]]), ""]
    if res.get("one_row"):
        parts += ["## ONE_ROW_DIVISOR: compiled ParaGRU forward, ms", "",
                  markdown_table(["B, T, d", "one row per piece", "several rows per piece"],
                                 [[f"{r['B']}, {r['T']}, {r['d']}", f"{r['ms']['one_row']:.2f}",
                                   f"{r['ms']['several_rows']:.2f}"] for r in res["one_row"]]), ""]
    if res.get("onednn"):
        keys = list(res["onednn"][0]["us"])
        parts += ["## ONEDNN_MIN_MACS: forward of [rows, 64] -> 192, fp32, µs", "",
                  markdown_table(["rows", "MACs", *keys], [[r["rows"], r["macs"], *(f"{r['us'][k]:.1f}" for k in keys)]
                                                         for r in res["onednn"]]), ""]
    if res.get("tanh"):
        t = res["tanh"]
        parts += [f"## tanh, compiled, {t['n']} fp32 elements, ms", "",
                  markdown_table(list(t["ms"]), [[f"{v:.3f}" for v in t["ms"].values()]]), ""]
    if res.get("fusion"):
        parts += ["## fusion_pays: compiled / eager evaluation, RNN(cell, mode=\"parallel\"), ms", "",
                  markdown_table(["cell", "structure", "B, T, d", "compiled fwd / fwd+bwd", "eager fwd / fwd+bwd",
                                  "eager / compiled time", "compile_cell=\"auto\" compiles"],
                                 [[r["cell"], r["structure"], f"{r['B']}, {r['T']}, {r['d']}",
                                   f"{r['ms']['compiled_fwd_s']:.1f} / {r['ms']['compiled_fwdbwd_s']:.1f}",
                                   f"{r['ms']['eager_fwd_s']:.1f} / {r['ms']['eager_fwdbwd_s']:.1f}",
                                   (f"{r['ms']['eager_fwd_s'] / r['ms']['compiled_fwd_s']:.2f} / "
                                    f"{r['ms']['eager_fwdbwd_s'] / r['ms']['compiled_fwdbwd_s']:.2f}"),
                                   "yes" if r["auto_compiles"] else "no"] for r in res["fusion"]]), ""]
    return "\n".join(parts)


def main(argv=None) -> dict:
    from pararnn_studies.common import ensure_writable, run_metadata, set_threads, write_json_atomic, write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a test)")
    ap.add_argument("--out", default="results/bench_constants.json")
    ap.add_argument("--parts", help=f"comma-separated, from {', '.join(PARTS)} (default: all; "
                                     "with --smoke all but chunk_factor)")
    args = ap.parse_args(argv)
    if args.parts is None:
        args.parts = ",".join(p for p in PARTS if not (args.smoke and p == "chunk_factor"))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        raise SystemExit(f"bench_constants: --parts must name some of {', '.join(PARTS)}, got {args.parts!r}")
    ensure_writable(args.out, "--out")
    set_threads(args.threads)
    res = run_metadata({"threads": args.threads, "smoke": args.smoke, "parts": parts})
    runs = {"chunk_factor": lambda: chunk_factor([(1, 16384, 64), (8, 4096, 256)]),
            "one_row": lambda: one_row([(8, 1024, 256), (16, 512, 256), (32, 256, 256)]),
            "onednn": lambda: onednn([1, 16, 64, 256, 1024, 4096, 32768]),
            "tanh": tanh,
            "fusion": fusion}
    if args.smoke:
        runs.update(chunk_factor=lambda: chunk_factor([(2, 40, 4)], factors=(1, 4), repeats=1),
                    one_row=lambda: one_row([(2, 40, 4)], repeats=1), onednn=lambda: onednn([1, 64], repeats=2),
                    tanh=lambda: tanh(1 << 12, repeats=2),
                    fusion=lambda: fusion(("paragru",), ((2, 40, 4),), repeats=1))
    for part in parts:
        res[part] = runs[part]()
    write_json_atomic(args.out, res)
    write_text(os.path.splitext(args.out)[0] + ".md", markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
