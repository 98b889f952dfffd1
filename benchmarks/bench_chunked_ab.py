"""Two checkouts of pararnn side by side on bench_chunked.py's cases: peak RSS above the inputs and
fwd+bwd time of a chunked and a whole solve, each case in a fresh subprocess, the two checkouts
interleaved run by run (the machine is noisy; medians of the times, the largest peak).

Usage: python benchmarks/bench_chunked_ab.py OLD_CHECKOUT NEW_CHECKOUT [--repeats 3] [--out results/bench_chunked_ab.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_chunked import CHILD  # noqa: E402

CASES = [("deltanet", 2, 8192, 64, "none"), ("deltanet", 2, 8192, 64, "256"),
         ("paragru", 1, 1_000_000, 16, "none"), ("paragru", 1, 1_000_000, 16, "65536")]


def run(checkout: str, case) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout}
    p = subprocess.run([sys.executable, "-c", CHILD, *map(str, case)], capture_output=True, text=True, env=env,
                       cwd=checkout, timeout=900)
    if p.returncode:
        return {"error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench_chunked_ab.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.new)
    from pararnn_studies.common import markdown_table, run_metadata, write_text

    rows = []
    for case in CASES:
        runs = {"old": [], "new": []}
        for _ in range(args.repeats):
            for name in ("old", "new"):
                runs[name].append(run(getattr(args, name), case))
        row = {"cell": case[0], "B": case[1], "T": case[2], "d": case[3], "chunk_size": case[4]}
        for name, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            row[name] = {"fwdbwd_s": statistics.median(r["fwdbwd_s"] for r in ok) if ok else None,
                         "peak_MB": max(r["above_inputs_MB"] for r in ok) if ok else None,
                         "errors": [r["error"] for r in rs if "error" in r]}
        rows.append(row)
        print(row, flush=True)
    meta = run_metadata({"old": args.old, "new": args.new, "repeats": args.repeats, "threads": 1})
    meta["command"] = " ".join(["python benchmarks/bench_chunked_ab.py", *(argv or sys.argv[1:])])
    with open(args.out, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    table = markdown_table(["cell", "B, T, d", "chunk_size", "old: fwd+bwd (s), peak (MB)", "new: fwd+bwd (s), peak (MB)",
                            "new / old time"],
                           [[r["cell"], f"{r['B']}, {r['T']}, {r['d']}", r["chunk_size"],
                             f"{r['old']['fwdbwd_s']:.2f}, {r['old']['peak_MB']:.0f}",
                             f"{r['new']['fwdbwd_s']:.2f}, {r['new']['peak_MB']:.0f}",
                             f"{r['new']['fwdbwd_s'] / r['old']['fwdbwd_s']:.2f}"] for r in rows])
    write_text(args.out.replace(".json", ".md"), f"Machine: {meta['machine']}; commit {meta['commit']}\n\n{table}")


if __name__ == "__main__":
    main()
