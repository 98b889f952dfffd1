"""Peak memory against T for a parallel forward+backward (ParaGRU, d = 64, B = 1).

Each T runs in a fresh subprocess and reports its peak resident set size (ru_maxrss), minus the
baseline of a process that only imported torch and pararnn. Writes results/bench_memory.json.
Usage: python benchmarks/bench_memory.py [--Ts 10000,100000,1000000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import resource, sys, time, torch, pararnn
from pararnn.models import ParaGRU
torch.set_num_threads(1)
T, d = int(sys.argv[1]), 64
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if T > 0:
    torch.manual_seed(0)
    cell = ParaGRU(d, d)
    x = torch.randn(1, T, d, requires_grad=True)
    t = time.perf_counter()
    y, hT, info = pararnn.RNN(cell)(x, return_info=True)
    y.sum().backward()
    dt = time.perf_counter() - t
    assert info.all_converged
else:
    dt = 0.0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak, dt)
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--Ts", default="10000,100000,1000000")
    ap.add_argument("--out", default="results/bench_memory.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, ".")
    from pararnn_studies.common import ensure_writable, run_metadata, write_json_atomic

    ensure_writable(args.out, "--out")

    rows = []
    base_kb = int(subprocess.run([sys.executable, "-c", CHILD, "0"], capture_output=True, text=True,
                                 check=True).stdout.split()[1])
    print("| T | peak RSS (MB) | above import baseline (MB) | bytes per step | fwd+bwd (s) |")
    print("|---|---|---|---|---|")
    for T in [int(t) for t in args.Ts.split(",")]:
        out = subprocess.run([sys.executable, "-c", CHILD, str(T)], capture_output=True, text=True, check=True)
        _, peak_kb, dt = out.stdout.split()
        peak = int(peak_kb) * 1024
        above = peak - base_kb * 1024
        rows.append({"T": T, "d": 64, "B": 1, "peak_rss_bytes": peak, "above_baseline_bytes": above,
                     "bytes_per_step": above / T, "fwdbwd_s": float(dt)})
        print(f"| {T} | {peak / 2**20:.0f} | {above / 2**20:.0f} | {above / T:.0f} | {float(dt):.2f} |")
        write_json_atomic(args.out, {**run_metadata(vars(args)), "cell": "ParaGRU d=64 B=1, fp32", "rows": rows})  # each row kept
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
