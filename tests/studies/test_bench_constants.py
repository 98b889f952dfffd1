"""benchmarks/bench_constants.py: a smoke run writes its JSON and table; the patched constant is
the one the solver reads."""
import json

import pytest
import torch
from helpers import load_script

from pararnn.solver import evaluate as solver_evaluate


def test_smoke_run_writes_results(tmp_path):
    mod = load_script("bench_constants")
    out = tmp_path / "c.json"
    res = mod.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["machine"]["cpu"] and "commit" in saved
    assert [r["rows"] for r in saved["onednn"]] == [1, 64] and all(v > 0 for v in saved["onednn"][0]["us"].values())
    assert set(saved["tanh"]["ms"]) == {"torch.tanh", "fastmath.tanh"}
    assert set(saved["one_row"][0]["ms"]) == {"one_row", "several_rows"}
    assert saved["fusion"][0]["auto_compiles"] is True and "chunk_factor" not in saved
    assert set(saved["fusion"][0]["ms"]) == {f"{k}_{p}_s" for k in ("compiled", "eager") for p in ("fwd", "fwdbwd")}
    assert (tmp_path / "c.md").read_text().startswith("# Constants' measurements")
    assert res["settings"]["smoke"] is True


def test_constant_patch_reaches_the_piece_plan():
    mod = load_script("bench_constants")
    before = solver_evaluate.pieces_for(8, 4096, 256, 1 << 18, True)
    with mod._constant(solver_evaluate, "COMPILED_CHUNK_FACTOR", 1), mod._constant(solver_evaluate, "ONE_ROW_DIVISOR", 0):
        after = solver_evaluate.pieces_for(8, 4096, 256, 1 << 18, True)
    assert solver_evaluate.COMPILED_CHUNK_FACTOR == 4 and before != after
    assert torch.tensor([b1 - b0 for b0, b1, _, _ in before]).max() == 1  # one sequence per piece by default


def test_parts_are_checked(tmp_path):
    mod = load_script("bench_constants")
    with pytest.raises(SystemExit, match="--parts"):
        mod.main(["--smoke", "--parts", "tanh,nope", "--out", str(tmp_path / "c.json")])
