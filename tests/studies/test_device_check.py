"""benchmarks/device_check.py, the first GPU run: its own budget stays under 8 minutes, and its dry
run (CPU, tiny sizes, Triton's interpreter) writes every part's results and a summary."""
import json
import os

import pytest
from helpers import load_script


def load():
    return load_script("device_check")


def test_budget_is_at_most_eight_minutes():
    dc = load()
    assert set(dc.BUDGET) == set(dc.PARTS)
    assert sum(dc.BUDGET.values()) <= dc.TOTAL_BUDGET == 8 * 60


def test_every_kernel_variant_is_listed():
    """13 kernels (diagonal fp32/fp16/bf16/complex64, blocks 2-4 in fp32/fp16/bf16) x 6 flag sets."""
    cases = load().kernel_cases()
    assert len(cases) == len(set(cases)) == 13 * 6
    assert not [c for c in cases if c[3] and c[5]]  # h0 with adjoint: not a kernel variant


def test_dry_run_writes_every_part(tmp_path):
    pytest.importorskip("triton")
    dc = load()
    parts = ["env", "kernels", "paths", "suite"]  # timings: tests/studies/test_bench_gpu.py runs its parts
    assert dc.main(["--dry-run", "--out", str(tmp_path), "--parts", ",".join(parts)]) == 0
    files = sorted(os.listdir(tmp_path))
    assert files == [f"{i}_{p}.json" for i, p in enumerate(parts, 1)] + ["summary.json"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    kernels = json.loads((tmp_path / "2_kernels.json").read_text())["result"]["cases"]
    assert kernels and all(c["ok"] for c in kernels)
    paths = json.loads((tmp_path / "3_paths.json").read_text())["result"]["cases"]
    split = next(c for c in paths if c["case"].startswith("T-split"))
    assert split["ok"] and split["pieces"] > 1 and split["contiguous"]


def test_a_failing_part_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    dc = load()
    monkeypatch.setitem(dc.PARTS, "env", lambda dry, deadline: 1 / 0)
    assert dc.main(["--dry-run", "--out", str(tmp_path), "--parts", "env,suite"]) == 1
    env = json.loads((tmp_path / "1_env.json").read_text())
    assert not env["ok"] and "ZeroDivisionError" in env["result"]["error"]
    assert json.loads((tmp_path / "2_suite.json").read_text())["ok"]


def test_unknown_part_is_named():
    with pytest.raises(SystemExit):
        load().main(["--dry-run", "--out", "/tmp/x", "--parts", "env,bogus"])
