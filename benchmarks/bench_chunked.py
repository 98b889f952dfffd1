"""Bounded memory: peak RSS and time of a forward+backward with chunk_size against the whole solve.

Every case runs in a fresh subprocess (1 torch thread) and reports its peak resident set size
(ru_maxrss) above the point where its inputs exist, and the fwd+bwd wall time. glibc keeps freed
buffers of up to 32 MB in its heap (its mmap threshold adapts upward), so by default RSS also counts
the freed temporaries of earlier chunks; each case is therefore measured twice, with glibc's
default and with ``MALLOC_MMAP_THRESHOLD_=65536`` (RSS then follows live memory, but every large
allocation is page-faulted afresh, so its times are slower; the time ratio uses the default runs).

Usage: python benchmarks/bench_chunked.py [--quick] [--cells deltanet,paragru] [--repeats 3] [--out results/bench_chunked.json]
Writes JSON (version, commit, date, machine, settings) and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch, pararnn
from pararnn.models import DeltaNet, ParaGRU
torch.set_num_threads(1)
cell_name, B, T, d, C = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
cell = DeltaNet(d, d, d) if cell_name.startswith("deltanet") else ParaGRU(d, d)
chunk = None if C == "none" else ("auto" if C == "auto" else int(C))
rnn = pararnn.RNN(cell, chunk_size=chunk)
warm = torch.randn(1, 64, d)
rnn(warm)[0].sum().backward()  # compile numba, probe the cell: one-off costs outside the measurement
x = torch.randn(B, T, d, requires_grad=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
y, _, info = rnn(x, return_info=True)
y.sum().backward()
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"above_inputs_MB": (peak - base) / 1024, "fwdbwd_s": dt, "converged": info.all_converged,
                  "chunks": len(info.chunks or []) or 1, "iterations": info.iterations}))
"""


def run_case(cell, B, T, d, C, mmap):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    r = subprocess.run([sys.executable, "-c", CHILD, cell, str(B), str(T), str(d), str(C)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small T (a minute), for a smoke run")
    ap.add_argument("--cells", default="deltanet,paragru,deltanet_large",
                    help="which workloads to run (comma-separated): deltanet, paragru, deltanet_large (the "
                         "largest DeltaNet within 8 GB, whole solve against chunked)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each glibc-default case that has a time ratio, interleaved (median time, "
                         "largest peak)")
    ap.add_argument("--out", default="results/bench_chunked.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, ".")
    from tqdm import tqdm

    from pararnn_studies.common import ensure_writable, markdown_table, run_metadata, write_json_atomic, write_text

    ensure_writable(args.out, "--out")
    s = 16 if args.quick else 1
    # (cell, B, T, d, chunk sizes); targets: DeltaNet 64x64 B=2 T=8192 <= 400 MB, ParaGRU d=16
    # T=4e6 <= 1.5 GB, ParaGRU d=64 T=1e7 runs within 8 GB; chunked time <= 1.6x the whole solve
    # (cell, B, T, d, chunk sizes, also run with the 64 KB mmap threshold)
    cases = [("deltanet", 2, 8192 // s, 64, ["none", 256, 1024], True),
             ("paragru", 1, 1_000_000 // s, 16, ["none", 65536], True),
             ("paragru", 1, 4_000_000 // s, 16, [65536], True),
             ("paragru", 1, 10_000_000 // s, 64, [65536], False),  # the mmap run page-faults for 12 min
             # the largest DeltaNet within 8 GB: the whole solve needs ~97 KB per step at 64x64 (and 4x
             # that at 128x128), so these are about the largest whole solves that fit; chunked, the same
             ("deltanet_large", 1, 65536 // s, 64, ["none", 256], False),
             ("deltanet_large", 1, 16384 // s, 128, ["none", 256], False)]
    cases = [c for c in cases if c[0] in args.cells.split(",")]
    jobs = [(c, B, T, d, C, mmap) for c, B, T, d, Cs, both in cases for C in Cs for mmap in ((False, True) if both
                                                                                            else (False,))]
    # the time ratio's cases run --repeats times, interleaved (the machine is noisy); the rest once
    timed = {(c, T, d) for c, B, T, d, Cs, both in cases if "none" in Cs}
    jobs += [j for _ in range(args.repeats - 1) for j in jobs if not j[5] and (j[0], j[2], j[3]) in timed]
    rows, by_key = [], {}
    for cell, B, T, d, C, mmap in tqdm(jobs, desc="bench chunked", unit="case"):
        got = run_case(cell, B, T, d, C, mmap)
        key = (cell, T, d, C, mmap)
        if key not in by_key:
            by_key[key] = {"cell": cell, "B": B, "T": T, "d": d, "chunk_size": C, "mmap_threshold_64k": mmap, **got,
                           "runs": []}
            rows.append(by_key[key])
        row = by_key[key]
        row["runs"].append(got)
        ok = [r for r in row["runs"] if "error" not in r]
        if ok and "error" not in row:
            times = sorted(r["fwdbwd_s"] for r in ok)
            row["fwdbwd_s"] = times[(len(times) - 1) // 2]  # the median (the lower one of an even count)
            row["above_inputs_MB"] = max(r["above_inputs_MB"] for r in ok)
        write_json_atomic(args.out, {**run_metadata(vars(args)), "rows": rows})  # nothing lost if interrupted

    def cell_text(r):
        if "error" in r:
            return "failed: " + r["error"].strip().splitlines()[-1][:80]
        n = len(r.get("runs", ()))
        return f"{r['above_inputs_MB']:.0f} MB, {r['fwdbwd_s']:.2f} s" + (f" (median of {n})" if n > 1 else "")

    keyed = {(r["cell"], r["T"], r["d"], r["chunk_size"], r["mmap_threshold_64k"]): r for r in rows}
    table = []
    for cell, B, T, d, Cs, both in cases:
        for C in Cs:
            default, mmap = keyed[(cell, T, d, C, False)], keyed.get((cell, T, d, C, True), {"error": "not run"})
            whole = keyed.get((cell, T, d, "none", False))  # times: glibc's default (the mmap runs page-fault)
            ratio = (f"{default['fwdbwd_s'] / whole['fwdbwd_s']:.2f}×" if whole and C != "none"
                     and "error" not in whole and "error" not in default else "–")
            table.append([cell, B, T, d, C, default.get("chunks", "–"), cell_text(default),
                          cell_text(mmap) if both else "not run", ratio])
    md = markdown_table(["cell", "B", "T", "d", "chunk_size", "chunks", "peak above inputs, time (glibc default)",
                         "same, mmap threshold 64 KB", "time vs whole solve"], table)
    base = os.path.splitext(args.out)[0]
    write_text(base + ".md", md)
    print(md)
    print(f"\nresults: {args.out}, {base}.md")


if __name__ == "__main__":
    main()
