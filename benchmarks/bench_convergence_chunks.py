"""Do time chunks (chunk_size) rescue Newton on hard cells? Steps, fallbacks, error and time per C.

The hard cells of bench_convergence.py (ParaGRU / ParaLSTM with recurrent vectors of standard
deviation a_std, dense Elman with spectral radius rho), T = 4096, d = 64, fp32, forward only,
1 thread, default options (max_iters 30). For each chunk size C (None = the whole of T): the
worst chunk's Newton steps, how many (chunk, sequence) pairs fell back to the sequential loop, the
error against a float64 sequential solve (relative to the largest state), and the median time
of 3 with the sequential loop and every C interleaved. Writes results/bench_convergence_chunks.json|md.

Usage: python benchmarks/bench_convergence_chunks.py [--chunk-sizes 32,128,512] [--out ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convergence import _cell  # noqa: E402

CASES = [("paragru", 1.0), ("paragru", 1.5), ("paragru", 2.0), ("paralstm", 1.5), ("paralstm", 2.0), ("elman", 1.5)]


def one(kind, size, B, chunk_sizes, repeats=3):
    import pararnn
    from pararnn.utils.timing import interleaved_medians

    cell = _cell(kind, size, 64, 0)
    x = torch.randn(B, 4096, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pararnn.RNN(cell.double(), mode="sequential")(x.double())[0]
        cell.float()
        seq = pararnn.RNN(cell, mode="sequential")
        fns, rows = {"sequential": lambda: seq(x)}, {}
        for C in chunk_sizes:
            rnn = pararnn.RNN(cell, chunk_size=C)
            y, _, info = rnn(x, return_info=True)
            chunks = info.chunks or [info]
            rows[str(C)] = {"newton_steps": max(c.iterations for c in chunks),
                            "fell_back": sum(int(c.fell_back.sum()) for c in chunks), "chunks": len(chunks),
                            "rel_err": ((y.double() - ref).abs().max() / ref.abs().max()).item()}
            fns[str(C)] = (lambda r=rnn: r(x))
        t = interleaved_medians(fns, repeats)
    for C in rows:
        rows[C]["ms"] = t[C] * 1e3
    return {"cell": kind, "size": size, "B": B, "sequential_ms": t["sequential"] * 1e3, "by_chunk_size": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk-sizes", default="32,128,512")
    ap.add_argument("--out", default="results/bench_convergence_chunks.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, ".")
    from tqdm import tqdm

    from pararnn_studies.common import ensure_writable, markdown_table, run_metadata, set_threads, write_json_atomic, write_text

    ensure_writable(args.out, "--out")
    set_threads(1)
    sizes = [None] + [int(c) for c in args.chunk_sizes.split(",")]
    rows = []
    for kind, size in tqdm(CASES, desc="hard cells", unit="cell"):
        for B in (1, 4):
            rows.append(one(kind, size, B, sizes))
            write_json_atomic(args.out, {**run_metadata(vars(args)), "rows": rows})
    header = ["cell", "a_std or ρ", "B", "sequential (ms)"] + [f"C = {c or 'T (whole)'}: steps / fell back / ms"
                                                               for c in sizes]
    md = markdown_table(header, [[r["cell"], r["size"], r["B"], f"{r['sequential_ms']:.0f}"] + [
        f"{v['newton_steps']} / {v['fell_back']} / {v['ms']:.0f}" for v in r["by_chunk_size"].values()] for r in rows])
    write_text(os.path.splitext(args.out)[0] + ".md", md)
    print(md)


if __name__ == "__main__":
    main()
