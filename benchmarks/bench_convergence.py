"""Newton convergence against the size of the recurrent weights: iterations, sweeps, fallbacks, accuracy, time.

The sweep of hard-but-predictable cells: a GRU-like diagonal cell (ParaGRU) whose recurrent
vectors are drawn with standard deviation a_std, ParaLSTM (Block(2)) likewise, and a dense Elman
cell whose recurrent matrix has spectral radius rho. For each: the largest Lyapunov exponent
(`pararnn.diagnose`); the parallel solve with default options (Newton steps, multiple-shooting
sweeps where Newton stalled, safeguard, sequences that fell back to the sequential loop, error
against a float64 sequential solve); the same solve with Newton alone (shooting=None: its steps,
fallbacks and time, and, untimed, the steps it needs when it may take up to --uncapped); and the
wall times against `mode="sequential"` (medians, the three methods interleaved), in the latency
regime (B = 1), a wider batch (B = 4) and, for ParaGRU, the bandwidth regime (B = 8, d = 256).
Writes results/bench_convergence.json and .md.

Usage: python benchmarks/bench_convergence.py [--quick] [--threads 1] [--bound 1.0] [--uncapped 200]
       [--out results/bench_convergence.json]
       python benchmarks/bench_convergence.py --seeds 1,2,3   (untimed counts for other draws)
       python benchmarks/bench_convergence.py --train         (forward + backward against the loop)
("size" is a_std for ParaGRU/ParaLSTM and the spectral radius rho for Elman.)
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch


def _cell(kind: str, size: float, d: int, seed: int, bound: float | None = None):
    from pararnn.models import Elman, ParaGRU, ParaLSTM, bound_recurrent_weights

    torch.manual_seed(seed)
    with torch.no_grad():
        if kind == "paragru":
            cell = ParaGRU(d, d)
            cell.a.normal_(0, size)
        elif kind == "paralstm":
            cell = ParaLSTM(d, d)
            cell.a.normal_(0, size)
            cell.p.normal_(0, size)
        else:  # dense Elman with spectral radius `size`
            cell = Elman(d, d)
            W = torch.randn(d, d) / d**0.5
            cell.weight_hh.copy_(W * (size / torch.linalg.eigvals(W).abs().max()))
    return cell if bound is None else bound_recurrent_weights(cell, bound)


def one_case(kind: str, size: float, B: int, T: int, d: int, repeats: int, seed: int = 0,
             bound: float | None = None, uncapped: int = 200) -> dict:
    import pararnn
    from pararnn.utils.timing import interleaved_medians

    cell = _cell(kind, size, d, seed, bound)
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed + 1))
    lam = pararnn.diagnose(cell, x[:, : min(T, 2048)], solve=False).lyapunov
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pararnn.RNN(cell.double(), mode="sequential")(x.double())[0]
        cell.float()
        par, alone = pararnn.RNN(cell), pararnn.RNN(cell, shooting=None)
        seq = pararnn.RNN(cell, mode="sequential")
        y, _, info = par(x, return_info=True)
        ya, _, info_a = alone(x, return_info=True)
        ys = seq(x)[0]
        yu, _, info_u = pararnn.RNN(cell, max_iters=uncapped, on_fail="warn", shooting=None)(x, return_info=True)
        scale = ref.abs().amax().item()
        t = interleaved_medians({"parallel": lambda: par(x), "alone": lambda: alone(x),
                                 "sequential": lambda: seq(x)}, repeats)

    def err(v):
        return (v.double() - ref).abs().max().item() / scale

    return {"cell": kind, "size": size, "bound": bound, "B": B, "T": T, "d": d, "lyapunov": lam,
            "newton_iterations": info.iterations, "sweeps": info.sweeps, "shooting_window": info.shooting_window,
            "safeguarded": info.safeguarded, "fell_back": int(info.fell_back.sum()),
            "converged": int(info.converged.sum()), "rel_err_parallel": err(y), "rel_err_sequential_fp32": err(ys),
            "alone_iterations": info_a.iterations, "alone_fell_back": int(info_a.fell_back.sum()),
            "rel_err_alone": err(ya),
            "uncapped_max_iters": uncapped, "uncapped_iterations": info_u.iterations,
            "uncapped_converged": int(info_u.converged.sum()), "rel_err_uncapped": err(yu),
            "parallel_fwd_s": t["parallel"], "alone_fwd_s": t["alone"], "sequential_fwd_s": t["sequential"],
            "speedup_fwd": t["sequential"] / t["parallel"], "speedup_alone_fwd": t["sequential"] / t["alone"]}


def seed_case(kind: str, size: float, seed: int, B: int = 4, T: int = 4096, d: int = 64) -> dict:
    """Untimed: Newton steps, sweeps and fallbacks of the default solve for another draw of weights and input."""
    import pararnn

    cell = _cell(kind, size, d, seed)
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed + 10))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = pararnn.RNN(cell)(x, return_info=True)[2]
    return {"cell": kind, "size": size, "seed": seed, "B": B, "T": T, "d": d, "newton_iterations": info.iterations,
            "sweeps": info.sweeps, "fell_back": int(info.fell_back.sum())}


def train_case(kind: str, size: float, B: int, T: int, d: int, repeats: int, seed: int = 0) -> dict:
    """A training step's solve: forward and backward (sum of the outputs), parallel (default options)
    against the sequential loop, medians interleaved."""
    import pararnn
    from pararnn.utils.timing import interleaved_medians

    cell = _cell(kind, size, d, seed)
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    par, seq = pararnn.RNN(cell), pararnn.RNN(cell, mode="sequential")

    def step(rnn):
        def run():
            y, _ = rnn(x)
            y.sum().backward()
        return run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = par(x.detach(), return_info=True)[2]
        t = interleaved_medians({"parallel": step(par), "sequential": step(seq)}, repeats, warmup=1)
    return {"cell": kind, "size": size, "B": B, "T": T, "d": d, "newton_iterations": info.iterations,
            "sweeps": info.sweeps, "fell_back": int(info.fell_back.sum()), "parallel_fwdbwd_s": t["parallel"],
            "sequential_fwdbwd_s": t["sequential"], "speedup_fwdbwd": t["sequential"] / t["parallel"]}


def table(rows) -> str:
    from pararnn_studies.common import markdown_table

    header = ["cell", "size", "B", "T", "d", "Lyapunov λ", "Newton steps", "sweeps", "safeguard", "fell back",
              "error (parallel)", "error (fp32 loop)", "parallel (ms)", "sequential (ms)", "speedup",
              "Newton alone: steps", "fell back", "ms", "speedup", "steps, uncapped", "converged, uncapped"]
    return markdown_table(header, [
        [r["cell"], r["size"], r["B"], r["T"], r["d"], f"{r['lyapunov']:.3f}", r["newton_iterations"],
         r["sweeps"], "yes" if r["safeguarded"] else "no", f"{r['fell_back']}/{r['B']}",
         f"{r['rel_err_parallel']:.1e}", f"{r['rel_err_sequential_fp32']:.1e}", f"{r['parallel_fwd_s'] * 1e3:.0f}",
         f"{r['sequential_fwd_s'] * 1e3:.0f}", f"{r['speedup_fwd']:.2f}×", r["alone_iterations"],
         f"{r['alone_fell_back']}/{r['B']}", f"{r['alone_fwd_s'] * 1e3:.0f}", f"{r['speedup_alone_fwd']:.2f}×",
         r["uncapped_iterations"], f"{r['uncapped_converged']}/{r['B']}"] for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 1024 and fewer sizes (about a minute)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bound", type=float, default=None,
                    help="bound the recurrent weights (pararnn.models.bound_recurrent_weights) at this value")
    ap.add_argument("--uncapped", type=int, default=200,
                    help="also solve once (untimed) by Newton alone with this max_iters: the steps it needs "
                         "without the default cap")
    ap.add_argument("--seeds", default=None,
                    help="instead: only the Newton steps, sweeps and fallbacks (untimed, B = 4) for these "
                         "comma-separated seeds, ParaGRU a_std 0.5-2.0 and ParaLSTM 1.5-2.0 "
                         "(writes results/bench_convergence_seeds.json by default)")
    ap.add_argument("--train", action="store_true",
                    help="instead: a training step's solve (forward + backward), parallel against the loop, for "
                         "ParaGRU a_std 0.5-2.0 (B = 1, d = 64 and B = 8, d = 256) and ParaLSTM 1.5-2.0 (B = 1) "
                         "(writes results/bench_convergence_train.json by default)")
    ap.add_argument("--out", default=None, help="default results/bench_convergence.json (or _seeds, _train)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = "results/bench_convergence" + ("_seeds" if args.seeds else "_train" if args.train else "") + ".json"
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tqdm import tqdm

    from pararnn_studies.common import (ensure_writable, markdown_table, run_metadata, set_threads, write_json_atomic,
                                        write_text)

    ensure_writable(args.out, "--out")
    set_threads(args.threads)
    if args.train:
        T = 1024 if args.quick else 4096
        cases = [("paragru", a, B, T, d) for a in (0.5, 1.0, 1.5, 2.0) for B, d in ((1, 64), (8, 256))] + \
                [("paralstm", a, 1, T, 64) for a in (1.5, 2.0)]
        rows = [train_case(*c, repeats=args.repeats) for c in tqdm(cases, desc="fwd+bwd", unit="case")]
        write_json_atomic(args.out, {**run_metadata(vars(args)), "units": "seconds (median), forward + backward",
                                     "rows": rows})
        md = markdown_table(["cell", "a_std", "B", "T", "d", "Newton steps", "sweeps", "fell back",
                             "parallel fwd+bwd (ms)", "sequential fwd+bwd (ms)", "speedup"],
                            [[r["cell"], r["size"], r["B"], r["T"], r["d"], r["newton_iterations"], r["sweeps"],
                              f"{r['fell_back']}/{r['B']}", f"{r['parallel_fwdbwd_s'] * 1e3:.0f}",
                              f"{r['sequential_fwdbwd_s'] * 1e3:.0f}", f"{r['speedup_fwdbwd']:.2f}×"] for r in rows])
        write_text(os.path.splitext(args.out)[0] + ".md", md)
        print(md)
        return 0
    if args.seeds:
        seeds = [int(v) for v in args.seeds.split(",")]
        cases = [(k, a, sd) for k, sizes in (("paragru", [0.5, 1.0, 1.5, 2.0]), ("paralstm", [1.5, 2.0]))
                 for a in sizes for sd in seeds]
        rows = [seed_case(k, a, sd, T=1024 if args.quick else 4096) for k, a, sd in tqdm(cases, desc="seeds", unit="case")]
        write_json_atomic(args.out, {**run_metadata(vars(args)), "rows": rows})
        md = markdown_table(["cell", "a_std", "seed", "B", "T", "Newton steps", "sweeps", "fell back"],
                            [[r["cell"], r["size"], r["seed"], r["B"], r["T"], r["newton_iterations"], r["sweeps"],
                              f"{r['fell_back']}/{r['B']}"] for r in rows])
        write_text(os.path.splitext(args.out)[0] + ".md", md)
        print(md)
        return 0
    T = 1024 if args.quick else 4096
    sweep = {"paragru": [0.5, 1.0, 1.5, 2.0, 3.0], "paralstm": [0.5, 1.0, 1.5, 2.0],
             "elman": [0.5, 0.9, 1.2, 1.5]}
    if args.quick:
        sweep = {k: v[:3] for k, v in sweep.items()}
    shapes = [(1, T, 64), (4, T, 64)]
    wide = (8, T, 256)  # the bandwidth regime, for the diagonal cell (dense Elman's J would be 8.6 GB here)
    cases = [(k, s, *shape) for k, sizes in sweep.items() for s in sizes
             for shape in shapes + ([wide] if k == "paragru" else [])]
    rows = [one_case(k, s, B, T_, d, args.repeats, bound=args.bound, uncapped=args.uncapped)
            for k, s, B, T_, d in tqdm(cases, desc="convergence", unit="case")]
    settings = {**vars(args), "T": T, "sweep": sweep, "shapes": shapes}
    write_json_atomic(args.out, {**run_metadata(settings), "units": "seconds (median), forward only", "rows": rows})
    md = table(rows)
    write_text(os.path.splitext(args.out)[0] + ".md", md)
    print(md)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
