"""The one-off cost of the compiled evaluation: the first call (forward + backward, then a forward
without gradients) of a default ``RNN(cell)`` in a fresh process, against the first call of a
trivial ``torch.compile``d function (inductor's own fixed cost, the floor for any compiled path).

Each case runs twice in fresh processes sharing one new temporary folder (``TMPDIR``, which holds
inductor's precompiled header, and ``TORCHINDUCTOR_CACHE_DIR`` inside it): "cold" is the first
(as on a fresh machine: every kernel and the header compiled by the C++ compiler), "warm" the
second (inductor's on-disk caches serve it). Each process times its first call and then the same
call again: the difference is the one-off cost. ``import torch`` and ``import pararnn`` are not
counted.

    python benchmarks/bench_first_call.py --threads 1 --out results/bench_first_call_xeon_1thread.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CASE = r"""
import json, sys, time
import torch
from pararnn_studies.common import set_threads
set_threads(int(sys.argv[2]))
t0 = time.perf_counter()
case = sys.argv[1]
if case == "trivial":
    f = torch.compile(lambda x: torch.sigmoid(x) * x + 1, dynamic=True)
    f(torch.randn(1000, 64))
else:
    import pararnn
    from pararnn.models import ParaGRU
    sys.path.insert(0, "benchmarks")
    from bench_default import StepOnlyGRU
    torch.manual_seed(0)
    cell = StepOnlyGRU(64, 64) if case == "step_only" else ParaGRU(64, 64)
    rnn, x = pararnn.RNN(cell), torch.randn(1, 16384, 64)
    def call():
        torch.autograd.grad(rnn(x)[0].sum(), list(cell.parameters()))
        with torch.no_grad():
            rnn(x)
    call()
t1 = time.perf_counter()
f(torch.randn(1000, 64)) if case == "trivial" else call()
print(json.dumps({"seconds": t1 - t0, "again": time.perf_counter() - t1}))
"""

CASES = ("trivial", "step_only", "paragru")


def run_case(case: str, threads: int, cache: str) -> dict:
    """One fresh process: ``{"seconds": first call, "again": the same call again}``."""
    env = {**os.environ, "TMPDIR": cache, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor")}
    r = subprocess.run([sys.executable, "-c", CASE, case, str(threads)], capture_output=True, text=True, env=env,
                       timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if r.returncode != 0:
        raise RuntimeError(f"{case}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    from pararnn_studies.common import ensure_writable, markdown_table, run_metadata, write_json_atomic, write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/bench_first_call.json")
    args = ap.parse_args(argv)
    ensure_writable(args.out, "--out")
    res = run_metadata({"threads": args.threads, "shape": "B1 T16384 d64", "cases": list(CASES)})
    res["rows"] = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as cache:
            cold, warm = run_case(case, args.threads, cache), run_case(case, args.threads, cache)
        res["rows"].append({"case": case, "cold_s": cold["seconds"], "cold_again_s": cold["again"],
                            "warm_s": warm["seconds"], "warm_again_s": warm["again"]})
        print(f"{case}: cold {cold['seconds']:.1f} s, warm {warm['seconds']:.1f} s (again {warm['again']:.2f} s)",
              flush=True)
        write_json_atomic(args.out, res)
    m = res["machine"]
    table = markdown_table(
        ["case", "first call, cold cache (s)", "first call, warm cache (s)", "the same call again (s)"],
        [[r["case"], f"{r['cold_s']:.1f}", f"{r['warm_s']:.1f}", f"{r['warm_again_s']:.2f}"] for r in res["rows"]])
    write_text(os.path.splitext(args.out)[0] + ".md",
               f"# First call in a fresh process: {m['cpu']}, {args.threads} thread(s), torch {m.get('torch')}, "
               f"commit {res['commit']}\n\ntrivial: a torch.compile'd one-line function; step_only / paragru: "
               "the default RNN(cell), forward + backward then a forward, B1 T16384 d64. Cold: a fresh TMPDIR "
               "(inductor's cache and precompiled header); warm: a second process on it; imports not counted\n\n" + table + "\n")
    return res


if __name__ == "__main__":
    main()
