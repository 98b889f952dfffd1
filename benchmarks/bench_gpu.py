"""GPU scan and Newton speed (CUDA only; exits cleanly without a GPU).

For the diagonal and 2×2-block scans at large B·d and T up to 2^16: achieved GB/s against the
device's copy bandwidth; and parallel Newton against the sequential loop on the same GPU.
Writes results/bench_gpu.json.   Usage: python benchmarks/bench_gpu.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/bench_gpu.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; skipping (nothing measured).")
        return 0
    import pararnn
    from pararnn.models.paragru import ParaGRU
    from pararnn.scan import scan_dispatch
    from pararnn.structure import Block
    from pararnn.studies.common import ensure_writable, run_metadata, write_json_atomic
    from pararnn.utils.timing import copy_bandwidth, median_time

    ensure_writable(args.out, "--out")

    dev = torch.device("cuda")
    Ts = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    BD = 1 << 14  # B·d lanes
    out = {**run_metadata({**vars(args), "Ts": Ts}), "scans": [], "newton": []}
    for T in Ts:
        for name, structure in (("diagonal", "diagonal"), ("block2", Block(2))):
            B, d = 8, BD // 8
            A = torch.rand(B, T, d, device=dev) if structure == "diagonal" else \
                torch.rand(B, T, d // 2, 2, 2, device=dev) * 0.5
            b = torch.randn(B, T, d, device=dev)
            res = torch.empty_like(b)
            t = median_time(lambda: scan_dispatch(A, b, None, structure, out=res), repeats=10, warmup=3, device=dev)
            nbytes = (A.numel() + 2 * b.numel()) * 4
            bw = copy_bandwidth(nbytes, device=dev)
            row = {"structure": name, "B": B, "T": T, "d": d, "scan_s": t, "GBps": nbytes / t / 1e9,
                   "copy_GBps": bw / 1e9, "fraction_of_copy": (nbytes / t) / bw}
            out["scans"].append(row)
            print(f"scan {name} T={T}: {row['GBps']:.0f} GB/s ({100 * row['fraction_of_copy']:.0f}% of copy)")
    for T in Ts:
        B, d = 8, 256
        cell = ParaGRU(d, d).to(dev)
        x = torch.randn(B, T, d, device=dev)
        rows = {}
        for mode in ("parallel", "sequential"):
            rnn = pararnn.RNN(cell, mode=mode)

            def run():
                y, _ = rnn(x)
                y.sum().backward()

            rows[mode] = median_time(run, repeats=3, warmup=1, device=dev, max_seconds=60)
        out["newton"].append({"B": B, "T": T, "d": d, **{f"{k}_fwdbwd_s": v for k, v in rows.items()},
                              "speedup": rows["sequential"] / rows["parallel"]})
        print(f"ParaGRU T={T}: parallel {rows['parallel'] * 1e3:.1f} ms, sequential "
              f"{rows['sequential'] * 1e3:.1f} ms ({rows['sequential'] / rows['parallel']:.1f}×)")
    write_json_atomic(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
