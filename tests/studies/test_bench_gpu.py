"""benchmarks/bench_gpu.py, the one GPU command: it exits cleanly without CUDA, and every part but
the device test run works end to end (on the CPU, tiny sizes, --smoke-cpu)."""
import json

import pytest
import torch
from helpers import load_script


def load():
    return load_script("bench_gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_exits_cleanly_without_cuda(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert load().main(["--all", "--out", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out and not out.exists()


def test_bad_part_is_named():
    with pytest.raises(SystemExit):
        load().main(["--parts", "scans,bogus"])


def test_smoke_on_cpu_writes_every_part(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    assert load().main(["--smoke-cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu-smoke" and "tests" not in res and res["commit"]
    assert {r["scan"] for r in res["compile"]} == {"diagonal fp32", "diagonal complex64", "block 2×2 fp32",
                                                    "block 4×4 fp32"}
    assert len(res["scans"]) == 8 and all(r["GBps"] > 0 and r["scan_s"] > 0 for r in res["scans"])
    assert {r["cell"] for r in res["newton"]} == {"ParaGRU", "ParaLSTM"}
    assert all(r["newton_iterations"] >= 1 and r["speedup_fwdbwd"] > 0 for r in res["newton"])
    assert {r["cell"] for r in res["cudnn"]} == {"GRU", "LSTM"} and all(r["torch_fwdbwd_s"] > 0 for r in res["cudnn"])
    md = (tmp_path / "gpu_smoke.md").read_text()
    for title in ("First call", "Scan bandwidth", "Parallel against sequential Newton", "torch.nn (cuDNN)"):
        assert title in md


def test_a_part_past_its_budget_skips_and_names_its_cases(tmp_path):
    mod = load()
    mod.BUDGET = {**mod.BUDGET, "newton": 0}
    out = tmp_path / "gpu_smoke.json"
    assert mod.main(["--smoke-cpu", "--parts", "newton", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["newton"] == [] and len(res["newton_skipped_for_time"]) == 4
    assert "Skipped for time" in (tmp_path / "gpu_smoke.md").read_text()
