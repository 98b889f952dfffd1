"""One command that measures pararnn on a CUDA GPU (exits cleanly, measuring nothing, without one).

    python benchmarks/bench_gpu.py --all     # about 10 minutes by its budgets (not yet run on a GPU)

Parts (``--parts`` picks some; ``--all`` or no flag runs every one, in this order):
  compile  first call of each Triton scan (JIT compile and autotuning of the pruned configs, in a
           fresh Triton cache) against its steady time
  scans    GB/s of the scans against the device's copy bandwidth: diagonal fp32 and complex64,
           2×2 and 4×4 blocks, T = 2^10..2^16 (the bytes read and written: A, b, out)
  newton   parallel against sequential Newton on the same GPU: ParaGRU and ParaLSTM, latency
           regime (B = 1, d = 64) and bandwidth regime (B = 8, d = 256), forward and fwd+bwd
  cudnn    pararnn's GRU and LSTM cells (torch.nn's equations and weights, parallel) against
           torch.nn.GRU / torch.nn.LSTM (cuDNN), fwd+bwd, B = 8, d = 64
  tests    the test suite's CUDA paths on the device, in a subprocess: the Triton kernels against
           the loop (tests/scan/test_triton.py), variable lengths (tests/solver/test_lengths.py) and autocast
           on CUDA for every cell (tests/models/test_models.py -k cuda): counts, time and the tail of the log
Writes results/gpu_<device>.json and .md (device: torch.cuda.get_device_name, lower-case, "_" for
anything but letters and digits), or --out. Every timing is a median with device synchronisation;
each part has a time budget (BUDGET: 10 minutes in all) past which it starts no new case.

``--smoke-cpu`` runs the parts but ``tests`` on the CPU with tiny sizes, so that this script
itself is tested without a GPU (tests/studies/test_bench_gpu.py); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the scripts put the checkout on sys.path themselves, in main
    from pararnn.utils.timing import Deadline

PARTS = ("compile", "scans", "newton", "cudnn", "tests")
# Seconds per part: a part stops starting new cases past its budget (and lists them as skipped), so
# the whole command stays near 10 minutes; a case already started runs to its end.
BUDGET = {"compile": 90, "scans": 90, "newton": 120, "cudnn": 60, "tests": 240}


def _scan_cases():
    """(name, structure, dtype) of the scans measured: every Triton kernel family."""
    from pararnn.structure import Block

    return [("diagonal fp32", "diagonal", torch.float32), ("diagonal complex64", "diagonal", torch.complex64),
            ("block 2×2 fp32", Block(2), torch.float32), ("block 4×4 fp32", Block(4), torch.float32)]


def _scan_inputs(structure, dtype, T: int, lanes_bytes: int, dev):
    """A, b for one scan: B = 8 rows, d chosen so that A holds about ``lanes_bytes``."""
    from pararnn.structure import as_structure

    B = 8
    k = 1 if structure == "diagonal" else structure.k
    per_lane = k * torch.empty((), dtype=dtype).element_size()  # A's bytes per state lane and step
    d = max(k * 8, min(2048, lanes_bytes // (B * T * per_lane)) // (k * 8) * (k * 8))
    st = as_structure(structure, d)
    A = torch.rand(B, T, *st.storage_shape(d), device=dev).to(dtype) * (0.9 if k == 1 else 0.9 / k)
    b = torch.randn(B, T, d, device=dev).to(dtype)
    return A, b, st, B, d


def part_compile(dev, smoke: bool, deadline: Deadline) -> list[dict]:
    from pararnn.kernels import dispatch
    from pararnn.utils.timing import median_time, sync

    rows = []
    for name, structure, dtype in _scan_cases():
        if deadline.over(name):
            continue
        A, b, st, B, d = _scan_inputs(structure, dtype, 1024, 1 << (16 if smoke else 24), dev)
        backend = dispatch.auto_backend(dev, dtype, st, d)
        sync(dev)
        t0 = time.perf_counter()
        dispatch.scan(A, b, None, st)
        sync(dev)
        first = time.perf_counter() - t0
        steady = median_time(lambda: dispatch.scan(A, b, None, st), repeats=5, warmup=1, device=dev)
        rows.append({"scan": name, "backend": backend, "B": B, "T": 1024, "d": d, "first_call_s": first,
                     "steady_s": steady, "compile_s": first - steady})
        print(f"compile {name} ({backend}): first call {first:.2f} s, then {steady * 1e3:.2f} ms", flush=True)
    return rows


def part_scans(dev, smoke: bool, deadline: Deadline) -> list[dict]:
    from pararnn.kernels import dispatch
    from pararnn.utils.timing import copy_bandwidth, median_time

    Ts = [256, 1024] if smoke else [1 << 10, 1 << 12, 1 << 14, 1 << 16]
    rows = []
    for T in Ts:
        for name, structure, dtype in _scan_cases():
            if deadline.over(f"{name} T={T}"):
                continue
            A, b, st, B, d = _scan_inputs(structure, dtype, T, 1 << (16 if smoke else 28), dev)
            out = torch.empty_like(b)
            t = median_time(lambda: dispatch.scan(A, b, None, st, out=out), repeats=10, warmup=2, device=dev,
                            max_seconds=20)
            nbytes = A.numel() * A.element_size() + 2 * b.numel() * b.element_size()
            bw = copy_bandwidth(nbytes, device=dev)
            rows.append({"scan": name, "backend": dispatch.auto_backend(dev, dtype, st, d), "B": B, "T": T, "d": d,
                         "bytes": nbytes, "scan_s": t, "GBps": nbytes / t / 1e9, "copy_GBps": bw / 1e9,
                         "fraction_of_copy": nbytes / t / bw})
            print(f"scan {name} T={T} d={d}: {nbytes / t / 1e9:.0f} GB/s, {100 * nbytes / t / bw:.0f}% of copy",
                  flush=True)
            del A, b, out
    return rows


def _time_fwd(rnn, x, dev, max_seconds: float) -> float:
    from pararnn.utils.timing import median_time

    def fwd():
        with torch.no_grad():
            rnn(x)

    return median_time(fwd, repeats=5, warmup=1, device=dev, max_seconds=max_seconds)


def _time_fwdbwd(step, x, dev, max_seconds: float) -> float:
    """Median seconds of a forward (``step(x)`` returns the outputs) and the backward of their sum."""
    from pararnn.utils.timing import median_time

    def fwdbwd():
        step(x).sum().backward()

    return median_time(fwdbwd, repeats=5, warmup=1, device=dev, max_seconds=max_seconds)


def _cell_cases(cells, shapes, dev, deadline: "Deadline"):
    """``(name, cell, x, row)`` for every cell class and ``(B, T, d)`` shape (cell ``d → d``, seeded, on
    ``dev``; ``x [B, T, d]`` wants grad), skipping (and naming) what comes past the part's budget."""
    for name, make in cells:
        for B, T, d in shapes:
            if deadline.over(f"{name} B={B} T={T} d={d}"):
                continue
            torch.manual_seed(0)
            cell = make(d, d).to(dev)
            x = torch.randn(B, T, d, device=dev, requires_grad=True)
            yield name, cell, x, {"cell": name, "B": B, "T": T, "d": d}


def part_newton(dev, smoke: bool, deadline: Deadline) -> list[dict]:
    import warnings

    import pararnn
    from pararnn.models import ParaGRU, ParaLSTM

    shapes = [(1, 256, 16), (2, 256, 16)] if smoke else \
        [(1, 4096, 64), (1, 16384, 64), (8, 1024, 256), (8, 4096, 256)]
    rows = []
    for name, cell, x, r in _cell_cases((("ParaGRU", ParaGRU), ("ParaLSTM", ParaLSTM)), shapes, dev, deadline):
        B, T, d = r["B"], r["T"], r["d"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, _, info = pararnn.RNN(cell)(x.detach(), return_info=True)
            r["newton_iterations"], r["sweeps"] = info.iterations, info.sweeps
            for mode in ("parallel", "sequential"):
                rnn = pararnn.RNN(cell, mode=mode)
                r[f"{mode}_fwd_s"] = _time_fwd(rnn, x, dev, 30)
                r[f"{mode}_fwdbwd_s"] = _time_fwdbwd(lambda v, rnn=rnn: rnn(v)[0], x, dev, 30)
        r["speedup_fwd"] = r["sequential_fwd_s"] / r["parallel_fwd_s"]
        r["speedup_fwdbwd"] = r["sequential_fwdbwd_s"] / r["parallel_fwdbwd_s"]
        rows.append(r)
        print(f"{name} B={B} T={T} d={d}: {r['newton_iterations']} Newton steps; parallel/sequential "
              f"fwd {r['speedup_fwd']:.1f}×, fwd+bwd {r['speedup_fwdbwd']:.1f}×", flush=True)
    return rows


def part_cudnn(dev, smoke: bool, deadline: Deadline) -> list[dict]:
    import warnings

    import pararnn
    from pararnn.models import GRU, LSTM

    shapes = [(2, 128, 16)] if smoke else [(8, 1024, 64), (8, 4096, 64), (1, 16384, 64)]
    rows = []
    for name, cell, x, r in _cell_cases((("GRU", GRU), ("LSTM", LSTM)), shapes, dev, deadline):
        B, T, d = r["B"], r["T"], r["d"]
        ref = cell.to_torch().to(dev)
        r["torch_fwdbwd_s"] = _time_fwdbwd(lambda v: ref(v)[0], x, dev, 30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rnn = pararnn.RNN(cell, mode="parallel")
            r["pararnn_fwdbwd_s"] = _time_fwdbwd(lambda v: rnn(v)[0], x, dev, 30)
            r["newton_iterations"] = rnn.last_info.iterations
        r["pararnn_over_torch"] = r["pararnn_fwdbwd_s"] / r["torch_fwdbwd_s"]
        rows.append(r)
        print(f"{name} B={B} T={T} d={d}: pararnn parallel {r['pararnn_fwdbwd_s'] * 1e3:.1f} ms, "
              f"torch.nn {r['torch_fwdbwd_s'] * 1e3:.1f} ms", flush=True)
    return rows


def part_tests(timeout: int) -> dict:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/scan/test_triton.py",
           "tests/solver/test_lengths.py", "tests/models/test_models.py", "-k", "triton or cuda or lengths"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        log, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", log.splitlines()[-1] if log else "")}
    seconds = time.perf_counter() - t0
    print(f"tests: {counts or rc} in {seconds:.0f} s", flush=True)
    return {"command": " ".join(cmd[1:]), "returncode": rc, "counts": counts, "seconds": seconds,
            "log_tail": log[-4000:]}


def markdown(out: dict) -> str:
    from pararnn_studies.common import markdown_table

    parts = [f"# pararnn on {out['device']}\n", f"pararnn {out['pararnn']}, commit {out['commit']}, {out['date']}\n"]
    if "compile" in out:
        parts += ["## First call (compile + autotune) against steady time\n", markdown_table(
            ["scan", "backend", "B, T, d", "first call (s)", "steady (ms)"],
            [[r["scan"], r["backend"], f"{r['B']}, {r['T']}, {r['d']}", f"{r['first_call_s']:.2f}",
              f"{r['steady_s'] * 1e3:.3f}"] for r in out["compile"]]), ""]
    if "scans" in out:
        parts += ["## Scan bandwidth (forward)\n", markdown_table(
            ["scan", "backend", "T", "B, d", "ms", "GB/s", "copy GB/s", "fraction of copy"],
            [[r["scan"], r["backend"], r["T"], f"{r['B']}, {r['d']}", f"{r['scan_s'] * 1e3:.3f}", f"{r['GBps']:.0f}",
              f"{r['copy_GBps']:.0f}", f"{r['fraction_of_copy']:.2f}"] for r in out["scans"]]), ""]
    if "newton" in out:
        parts += ["## Parallel against sequential Newton\n", markdown_table(
            ["cell", "B, T, d", "Newton steps", "parallel fwd / fwd+bwd (ms)", "sequential fwd / fwd+bwd (ms)",
             "speedup fwd", "speedup fwd+bwd"],
            [[r["cell"], f"{r['B']}, {r['T']}, {r['d']}", r["newton_iterations"],
              f"{r['parallel_fwd_s'] * 1e3:.2f} / {r['parallel_fwdbwd_s'] * 1e3:.2f}",
              f"{r['sequential_fwd_s'] * 1e3:.1f} / {r['sequential_fwdbwd_s'] * 1e3:.1f}",
              f"{r['speedup_fwd']:.1f}×", f"{r['speedup_fwdbwd']:.1f}×"] for r in out["newton"]]), ""]
    if "cudnn" in out:
        parts += ["## Against torch.nn (cuDNN), fwd+bwd\n", markdown_table(
            ["cell", "B, T, d", "Newton steps", "pararnn parallel (ms)", "torch.nn (ms)", "pararnn / torch.nn"],
            [[r["cell"], f"{r['B']}, {r['T']}, {r['d']}", r["newton_iterations"], f"{r['pararnn_fwdbwd_s'] * 1e3:.2f}",
              f"{r['torch_fwdbwd_s'] * 1e3:.2f}", f"{r['pararnn_over_torch']:.2f}×"] for r in out["cudnn"]]), ""]
    skipped = {k: v for k, v in out.items() if k.endswith("_skipped_for_time")}
    if skipped:
        parts += ["## Skipped for time\n"] + [f"- {k.split('_')[0]}: {', '.join(v)}" for k, v in skipped.items()] + [""]
    if "tests" in out:
        t = out["tests"]
        parts += ["## Tests on the device\n", f"`{t['command']}`: {t['counts'] or t['returncode']} "
                  f"in {t['seconds']:.0f} s (return code {t['returncode']})\n"]
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every part (the default when --parts is not given)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--tests-timeout", type=int, default=BUDGET["tests"], help="seconds for the tests part")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="run the parts but tests on the CPU with tiny sizes (checks this script; no real numbers)")
    ap.add_argument("--out", default=None, help="results JSON (default results/gpu_<device>.json)")
    args = ap.parse_args(argv)
    parts = PARTS if args.all else tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    if not args.smoke_cpu and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (use --smoke-cpu to check the script on CPU).")
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if "compile" in parts and not args.smoke_cpu:  # a cold cache, so the first calls compile
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pararnn_triton_cache_")
    from pararnn_studies.common import (
        ensure_writable,
        run_metadata,
        write_json_atomic,
        write_text,
    )
    from pararnn.utils.timing import Deadline

    dev = torch.device("cpu" if args.smoke_cpu else "cuda")
    device = "cpu-smoke" if args.smoke_cpu else torch.cuda.get_device_name(0)
    out_path = args.out or os.path.join("results", "gpu_" + re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_") + ".json")
    ensure_writable(out_path, "--out")
    out = {**run_metadata({**vars(args), "parts": list(parts)}), "device": device}
    t_start = time.perf_counter()
    for part in parts:
        if part == "tests":
            if args.smoke_cpu:
                continue  # the suite runs on CPU in CI already
            out["tests"] = part_tests(args.tests_timeout)
        else:
            deadline = Deadline(BUDGET[part])  # pararnn.utils.timing.Deadline
            out[part] = {"compile": part_compile, "scans": part_scans, "newton": part_newton,
                         "cudnn": part_cudnn}[part](dev, args.smoke_cpu, deadline)
            if deadline.skipped:
                out[f"{part}_skipped_for_time"] = deadline.skipped
                print(f"{part}: over its {BUDGET[part]} s budget, skipped {deadline.skipped}", flush=True)
        out["seconds"] = time.perf_counter() - t_start
        write_json_atomic(out_path, out)  # after every part: an interrupted run keeps what it measured
        write_text(os.path.splitext(out_path)[0] + ".md", markdown(out))
    print(f"results: {out_path} and .md ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
