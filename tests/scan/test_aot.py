"""The Triton scans compile for real GPUs (sm_80, sm_90) without spills, with no GPU present.

One configuration per kernel and dtype (the first of its autotune space), in a subprocess (the
suite runs Triton's interpreter, which replaces the compiler); the whole space is checked by
``python -m pararnn.kernels.aot``.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_every_kernel_and_dtype_compiles_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    r = _run(f"import sys; from pararnn.kernels.aot import main; sys.exit(main(['--quick', '--out', {str(out)!r}]))")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())
    kernels = {(row["kernel"], row["dtype"]) for row in rows}
    assert len(kernels) == 13 and {row["arch"] for row in rows} == {80, 90}  # 5 kernels, their dtypes
    assert all(row["ok"] and row["spill_bytes"] == 0 and row["registers"] <= 255 for row in rows)


def test_the_check_can_fail():
    """A config known to spill (block4, 32 steps x 16 lanes, 2 warps: 224 B on sm_80 with triton
    3.9.0, 304 B with 3.6.0) is reported."""
    r = _run("from pararnn.kernels.aot import compile_stats; "
             "st = compile_stats('block4', 'fp32', 80, 32, 16, 2); print('OK' if st.ok else 'SPILL', st.spill_bytes)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("SPILL") and int(r.stdout.split()[1]) > 0


def test_associative_scan_lowers_to_one_warp_scan_per_kernel():
    """The GPU lowering of tl.associative_scan, which the interpreter tests cannot see: one tt.scan
    over time (axis 0, forward: reverse time is done by addressing) with the tuple the combine
    expects, (a, b) = 2, complex 4, k×k blocks k² + k = 6 / 12 / 20 operands, implemented with
    warp shuffles in the PTX. The PTX itself cannot run without a GPU (the wheel has no emulator)."""
    r = _run("import json; from pararnn.kernels.aot import scan_lowering; print(json.dumps("
             "{n: scan_lowering(n) for n in ['diag_real', 'diag_complex', 'block2', 'block3', 'block4']}))")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    want = {"diag_real": 2, "diag_complex": 4, "block2": 6, "block3": 12, "block4": 20}
    for name, operands in want.items():
        assert got[name]["scans"] == [{"operands": operands, "axis": 0, "reverse": False}], (name, got[name])
        assert got[name]["ptx_warp_shuffles"] >= operands, (name, got[name])
