"""The first run on a GPU: one command that proves the most in at most 8 minutes from a cold cache.

    PYTHONPATH=. python benchmarks/device_check.py --out "$OUT"      # on the GPU machine
    python benchmarks/device_check.py --dry-run --out /tmp/check     # anywhere (CPU, tiny sizes)

Parts, in this order (the most valuable first), each with a time budget; each part's results are
written to ``<out>/<n>_<part>.json`` the moment it ends (a timeout keeps what ran), and an exception
in one part is recorded there and the next part runs. ``summary.json`` comes last.

1. ``env``: driver, torch, triton, the device and its SM count, and what the dispatch picks
   (backend and T-split pieces) for a few shapes.
2. ``kernels``: every Triton kernel (diagonal real and complex, blocks 2-4) x dtype x flags
   (h0, reverse, adjoint) against a float64 reference, into outputs pre-filled with NaN. One tile
   config per kernel (``PARARNN_TRITON_CONFIGS=first``: one compile per variant, in parallel worker
   processes sharing Triton's cache).
3. ``paths``: the T-split path, ``torch.compile`` of ``linear_scan``, a side stream, CUDA-graph
   capture and replay, and a tensor past 2^31 elements (two equal rows: the second row's offsets
   pass 2^31, so its output must equal the first's).
4. ``suite``: the test suite's CUDA paths on the device (Triton, lengths, autocast, chunked, split).
5. ``timings``: copy bandwidth and scan GB/s (full autotuning; the winning configs are recorded),
   ParaGRU/ParaLSTM parallel against sequential, GRU/LSTM against cuDNN; each timed output is
   checked against another backend first.

``--dry-run`` runs every part that does not need CUDA on the CPU with tiny sizes (Triton under its
interpreter); tests/studies/test_device_check.py runs it in CI.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib.util
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the scripts put the checkout on sys.path themselves, in main
    from pararnn.utils.timing import Deadline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds per part. A part starts no new case past its budget (and names what it skipped); the sum
# is the command's own bound, 8 minutes, checked by tests/studies/test_device_check.py.
BUDGET = {"env": 15, "kernels": 150, "paths": 60, "suite": 150, "timings": 100}
TOTAL_BUDGET = 480


def _device(dry: bool):
    import torch

    return torch.device("cpu" if dry else "cuda")


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------- 1
def part_env(dry: bool, deadline: Deadline) -> dict:
    import torch

    import pararnn
    from pararnn.kernels import dispatch
    from pararnn.structure import as_structure

    dev = _device(dry)
    out = {"python": platform.python_version(), "torch": torch.__version__, "pararnn": pararnn.__version__,
           "cuda_runtime": torch.version.cuda, "machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(device=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_GiB=round(p.total_memory / 2**30, 1))
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            out["driver"] = f"unknown ({e})"
    picks = []
    for B, T, d, st in [(1, 16384, 64, "diagonal"), (3, 5000, 64, "diagonal"), (16, 4096, 256, "diagonal"),
                        (8, 4096, 64, "block2"), (1, 4096, 32, "dense")]:
        from pararnn.structure import Block

        s = as_structure(Block(2) if st == "block2" else st, d)
        picks.append({"B": B, "T": T, "d": d, "structure": str(s),
                      "backend_fp32": dispatch.auto_backend(dev, torch.float32, s, d),
                      "time_pieces": dispatch.time_pieces(B, T, d, dev)})
    out["dispatch"] = picks
    return out


# ---------------------------------------------------------------------------------------------- 2
def kernel_cases() -> list[tuple]:
    """(kernel, dtype name, k, has_h0, reverse, adjoint) for every Triton kernel variant."""
    flags = [(h0, rev, False) for h0 in (False, True) for rev in (False, True)] + \
            [(False, rev, True) for rev in (False, True)]
    kinds = [("diag", dt, 1) for dt in ("float32", "float16", "bfloat16", "complex64")] + \
            [("block", dt, k) for k in (2, 3, 4) for dt in ("float32", "float16", "bfloat16")]
    return [(kind, dt, k, *f) for kind, dt, k in kinds for f in flags]


def run_kernel_case(case: tuple, dry: bool) -> dict:
    """One kernel variant against the float64 loop, its output buffer pre-filled with NaN."""
    import torch

    from pararnn.kernels.reference import scan_reference
    from pararnn.kernels.triton_scan import scan_triton
    from pararnn.structure import Block, as_structure

    kind, dt, k, has_h0, reverse, adjoint = case
    dev = _device(dry)
    dtype = getattr(torch, dt)
    B, T = 3, (9 if dry else 37)
    d = 8 if kind == "diag" else 4 * k
    st = as_structure("diagonal" if kind == "diag" else Block(k), d)
    g = torch.Generator().manual_seed(0)
    wide = torch.complex128 if dtype.is_complex else torch.float64
    A = torch.randn(B, T, *st.storage_shape(d), generator=g, dtype=wide)
    A = A / A.abs().clamp_min(1.0) if kind == "diag" else A * (0.6 / k**0.5)
    b = torch.randn(B, T, d, generator=g, dtype=wide)
    h0 = torch.randn(B, d, generator=g, dtype=wide) if has_h0 else None
    low = [t.to(dtype).to(dev) if t is not None else None for t in (A, b, h0)]
    want = scan_reference(*[t.to(wide).cpu() if t is not None else None for t in low], st, reverse, adjoint)
    out = torch.full((B, T, d), float("nan"), dtype=dtype, device=dev)
    t0 = time.perf_counter()
    got = scan_triton(*low, st, reverse, adjoint, out=out)
    _sync(dev)
    seconds = time.perf_counter() - t0
    err = ((got.cpu().to(wide) - want).abs().max() / want.abs().max()).item()
    tol = {"float32": 1e-5, "complex64": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}[dt]
    name = f"{kind}{k if kind == 'block' else ''} {dt} h0={int(has_h0)} rev={int(reverse)} adj={int(adjoint)}"
    return {"case": name, "rel_err": err, "tol": tol, "ok": bool(err <= tol), "first_call_s": seconds}


def _kernel_worker(cases: list[tuple], dry: bool) -> list[dict]:
    os.environ["PARARNN_TRITON_CONFIGS"] = "first"
    rows = []
    for case in cases:
        try:
            rows.append(run_kernel_case(case, dry))
        except Exception as e:  # noqa: BLE001 - recorded, the other cases go on
            rows.append({"case": str(case), "ok": False, "error": f"{type(e).__name__}: {e}"})
    return rows


def part_kernels(dry: bool, deadline: Deadline) -> dict:
    cases = kernel_cases()
    if dry:  # the interpreter takes 8-60 s per block variant: the diagonal kernels (the suite runs blocks)
        cases = [c for c in cases if c[:2] == ("diag", "float32")] + [("diag", "complex64", 1, True, True, False)]
        return {"cases": _kernel_worker(cases, dry), "note": "dry run: a subset of the variants"}
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    shards = [cases[i::workers] for i in range(workers)]
    rows, skipped = [], []
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        jobs = [pool.submit(_kernel_worker, shard, dry) for shard in shards]
        done, late = futures.wait(jobs, timeout=deadline.left())
        for job in done:
            rows += job.result()
        for job, shard in zip(jobs, shards):
            if job in late:
                job.cancel()
                skipped += [str(c) for c in shard]
    return {"workers": workers, "cases": rows, "skipped_for_time": skipped}


# ---------------------------------------------------------------------------------------------- 3
def part_paths(dry: bool, deadline: Deadline) -> dict:
    import torch

    import pararnn
    from pararnn.kernels import dispatch
    from pararnn.kernels.reference import scan_reference
    from pararnn.structure import as_structure

    dev = _device(dry)
    rows = []

    def record(name, fn):
        if deadline.over(name):
            return
        t0 = time.perf_counter()
        try:
            row = {"case": name, **fn()}
        except Exception as e:  # noqa: BLE001
            row = {"case": name, "ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)

    g = torch.Generator().manual_seed(1)
    B, T, d = (3, 50, 8) if dry else (3, 5000, 64)
    st = as_structure("diagonal", d)
    A = torch.rand(B, T, d, generator=g).mul_(0.95)
    b = torch.randn(B, T, d, generator=g)
    h0 = torch.randn(B, d, generator=g)
    want = scan_reference(A.double(), b.double(), h0.double(), st)
    Ad, bd, h0d = A.to(dev), b.to(dev), h0.to(dev)

    def close(got, tol=1e-5):
        err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
        return {"rel_err": err, "ok": bool(err <= tol)}

    def split():
        real = dispatch.time_pieces
        if dry:  # the CPU never splits: force it, as the GPU does for few rows
            dispatch.time_pieces = lambda *a, **k: 4
        try:
            pieces = dispatch.time_pieces(B, T, d, dev)
            got = dispatch.scan(Ad, bd, h0d, st, backend="triton")
        finally:
            dispatch.time_pieces = real
        return {"pieces": pieces, "contiguous": got.is_contiguous(), **close(got)}

    def compiled():
        f = torch.compile(lambda A, b, h0: pararnn.linear_scan(A, b, h0, backend="triton") * 1.0)
        return close(f(Ad, bd, h0d))

    def side_stream():
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            got = pararnn.linear_scan(Ad, bd, h0d, backend="triton")
        torch.cuda.current_stream(dev).wait_stream(s)
        return close(got)

    def graph():
        out = torch.empty_like(bd)
        dispatch.scan(Ad, bd, h0d, st, backend="triton", out=out)  # compile and autotune outside the capture
        torch.cuda.synchronize(dev)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            dispatch.scan(Ad, bd, h0d, st, backend="triton", out=out)
        out.fill_(float("nan"))
        gr.replay()
        torch.cuda.synchronize(dev)
        return close(out)

    def past_2_31():
        rows_T = (1 << 24) + 1  # 2 rows x T x 64 lanes > 2^31 elements: row 1's offsets pass 2^31
        A1 = torch.rand(1, rows_T, 64, device=dev).mul_(0.9).expand(2, rows_T, 64).contiguous()
        b1 = torch.randn(1, rows_T, 64, device=dev).expand(2, rows_T, 64).contiguous()
        got = dispatch.scan(A1, b1, None, as_structure("diagonal", 64), backend="triton")
        same = bool(torch.equal(got[0], got[1]))
        head = scan_reference(A1[:1, :256].double().cpu(), b1[:1, :256].double().cpu(), None,
                              as_structure("diagonal", 64))
        err = ((got[0, :256].double().cpu() - head[0]).abs().max() / head.abs().max()).item()
        finite = bool(torch.isfinite(got).all())
        del A1, b1, got
        torch.cuda.empty_cache()
        return {"elements": 2 * rows_T * 64, "rows_equal": same, "finite": finite, "head_rel_err": err,
                "ok": same and finite and err < 1e-5}

    record("T-split (few rows, long T)", split)
    record("torch.compile(linear_scan)", compiled)
    for name, fn in (("side stream", side_stream), ("CUDA graph capture and replay", graph),
                     ("tensor past 2^31 elements", past_2_31)):
        if dry:
            rows.append({"case": name, "skipped": "needs CUDA"})
        else:
            record(name, fn)
    return {"cases": rows, "skipped_for_time": deadline.skipped}


# ---------------------------------------------------------------------------------------------- 4
SUITE = ["tests/scan/test_triton.py", "tests/solver/test_lengths.py", "tests/models/test_models.py", "tests/scan/test_scan.py",
         "tests/solver/test_chunked.py", "-k", "triton or cuda or lengths or split"]


def part_suite(dry: bool, deadline: Deadline) -> dict:
    if dry:
        return {"skipped": "the suite runs these itself without a GPU", "command": " ".join(SUITE)}
    import re

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE]
    env = {**os.environ, "PARARNN_TRITON_CONFIGS": "first"}  # the kernels part's compiles, reused
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, deadline.left()), env=env)
        log, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        log = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = "timeout"
    last = log.strip().splitlines()[-1] if log.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    failed = re.findall(r"^FAILED (\S+)", log, flags=re.M)
    return {"command": " ".join(cmd[1:]), "returncode": rc, "counts": counts, "failed": failed,
            "seconds": time.perf_counter() - t0, "log_tail": log[-6000:]}


# ---------------------------------------------------------------------------------------------- 5
def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "benchmarks", "bench_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _checked_scans(dev, dry: bool) -> list[dict]:
    """Each scan family's timed output against the log-depth PyTorch scan, before it is timed."""
    import torch

    from pararnn.kernels import dispatch
    from pararnn.structure import Block, as_structure

    rows = []
    cases = (("diagonal fp32", "diagonal", torch.float32), ("block 2x2 fp32", Block(2), torch.float32),
             ("block 4x4 fp32", Block(4), torch.float32))
    for name, structure, dtype in cases[:2] if dry else cases:  # (blocks are slow to interpret)
        d = 8 if dry else 64
        st = as_structure(structure, d)
        g = torch.Generator().manual_seed(2)
        A = torch.randn(4, 16 if dry else 4096, *st.storage_shape(d), generator=g).mul_(0.3).to(dev, dtype)
        b = torch.randn(4, A.shape[1], d, generator=g).to(dev, dtype)
        got = dispatch.scan(A, b, None, st, backend="triton")
        ref = dispatch.scan(A, b, None, st, backend="assoc")
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        rows.append({"scan": name, "rel_err_vs_assoc": err, "ok": bool(err < 1e-4)})
    return rows


def autotune_winners() -> dict:
    """The tile config each autotuned kernel chose, per key (the feature size)."""
    from pararnn.kernels import triton_scan as tri

    kernels = {"diag_real": tri._diag_real, "diag_complex": tri._diag_complex,
               **{f"block{k}": kern for k, kern in tri._blocks.items()}}
    return {name: {str(key): str(cfg) for key, cfg in getattr(kern, "cache", {}).items()} for name, kern in kernels.items()}


def part_timings(dry: bool, deadline: Deadline) -> dict:
    from pararnn.utils.timing import Deadline, copy_bandwidth

    dev = _device(dry)
    bench = _bench_gpu()
    out = {"checked_outputs": _checked_scans(dev, dry)}

    out["copy_GBps"] = copy_bandwidth(1 << (20 if dry else 28), device=dev) / 1e9
    share = deadline.left() / 3
    for name, fn in (("scans", bench.part_scans), ("newton", bench.part_newton), ("cudnn", bench.part_cudnn)):
        d = Deadline(min(share, deadline.left()))
        out[name] = fn(dev, dry, d)
        out[f"{name}_skipped_for_time"] = d.skipped
    if not dry:
        out["autotune_winners"] = autotune_winners()
    return out


# ---------------------------------------------------------------------------------------------- runner
PARTS = {"env": part_env, "kernels": part_kernels, "paths": part_paths, "suite": part_suite, "timings": part_timings}


def _ok(result) -> bool:
    """No failed case anywhere in a part's result (``ok: False``, an error or failed tests)."""
    if isinstance(result, dict):
        if result.get("ok") is False or "error" in result or result.get("failed"):
            return False
        if result.get("returncode") not in (None, 0):
            return False
        return all(_ok(v) for v in result.values())
    if isinstance(result, list):
        return all(_ok(v) for v in result)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the parts' JSON files and summary.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown part(s) {unknown}; choose from {list(PARTS)}")
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    sys.path.insert(0, ROOT)
    import torch

    from pararnn.utils.timing import Deadline

    if not args.dry_run and not torch.cuda.is_available():
        print("device_check: no CUDA device (use --dry-run on a CPU)", flush=True)
        return 2
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    summary = {"dry_run": args.dry_run, "budget_s": {p: BUDGET[p] for p in parts}, "parts": {}}
    for i, name in enumerate(parts, 1):
        deadline = Deadline(BUDGET[name])
        t0 = time.perf_counter()
        try:
            result = PARTS[name](args.dry_run, deadline)
        except Exception as e:  # noqa: BLE001 - recorded; the next part runs
            result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-4000:]}
        seconds = time.perf_counter() - t0
        ok = _ok(result)
        with open(os.path.join(args.out, f"{i}_{name}.json"), "w") as f:
            json.dump({"part": name, "seconds": seconds, "ok": ok, "result": result}, f, indent=1, default=str)
        summary["parts"][name] = {"ok": ok, "seconds": round(seconds, 1), "budget_s": BUDGET[name]}
        print(f"device_check {name}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s", flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["ok"] = all(p["ok"] for p in summary["parts"].values())
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
