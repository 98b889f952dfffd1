"""bf16 autocast against fp32: Newton steps, error against the fp32 sequential solve, and time.

For ParaGRU, GRU and LRU (the cells of the mixed-precision acceptance list), parallel mode,
forward and forward+backward, fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
the two interleaved (medians). Writes results/bench_precision.json and .md.

Usage: python benchmarks/bench_precision.py [--T 4096] [--threads 1] [--out results/bench_precision.json]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/bench_precision.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import pararnn
    from pararnn.models import make_cell
    from pararnn_studies.common import (ensure_writable, markdown_table, run_metadata, set_threads,
                                        write_json_atomic, write_text)
    from pararnn.utils.timing import interleaved_medians

    ensure_writable(args.out, "--out")
    set_threads(args.threads)
    rows = []
    for name in ("paragru", "gru", "lru"):
        torch.manual_seed(0)
        cell = make_cell(name, args.d)
        x = torch.randn(args.B, args.T, args.d)
        rnn = pararnn.RNN(cell)
        with torch.no_grad():
            ref = pararnn.RNN(cell, mode="sequential")(x)[0]
        row = {"cell": name, "B": args.B, "T": args.T, "d": args.d}
        ctxs = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
        for prec, ctx in ctxs.items():
            with ctx(), torch.no_grad():
                y, _, info = rnn(x, return_info=True)
            row[f"{prec}_iters"] = info.iterations
            row[f"{prec}_rel_err"] = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        def run(ctx, backward):
            with ctx():
                if backward:
                    rnn(x)[0].float().sum().backward()
                else:
                    with torch.no_grad():
                        rnn(x)

        fns = {f"{p}_{k}_s": (lambda c=c, b=(k == "fwdbwd"): run(c, b)) for p, c in ctxs.items() for k in ("fwd", "fwdbwd")}
        row.update(interleaved_medians(fns, args.repeats))
        rows.append(row)
        write_json_atomic(args.out, {**run_metadata(vars(args)), "rows": rows})  # each cell kept as it ends
    md = markdown_table(
        ["cell", "B", "T", "d", "Newton steps fp32 / bf16", "error vs fp32 loop, fp32 / bf16",
         "fwd ms fp32 / bf16", "fwd+bwd ms fp32 / bf16"],
        [[r["cell"], r["B"], r["T"], r["d"], f"{r['fp32_iters']} / {r['bf16_iters']}",
          f"{r['fp32_rel_err']:.1e} / {r['bf16_rel_err']:.1e}",
          f"{r['fp32_fwd_s'] * 1e3:.0f} / {r['bf16_fwd_s'] * 1e3:.0f}",
          f"{r['fp32_fwdbwd_s'] * 1e3:.0f} / {r['bf16_fwdbwd_s'] * 1e3:.0f}"] for r in rows])
    write_text(os.path.splitext(args.out)[0] + ".md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
