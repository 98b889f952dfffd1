"""benchmarks/bench_default.py: a tiny run writes its rows; unknown cells are refused by name."""
import json

import pytest
from helpers import load_script


def test_tiny_run_writes_rows(tmp_path):
    mod = load_script("bench_default")
    out = tmp_path / "d.json"
    mod.main(["--cells", "paralstm", "--shapes", "1:64:4", "--repeats", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["cell"], row["B"], row["T"], row["d"]) == ("paralstm", 1, 64, 4)
    assert row["compiled"] is False and row["max_abs_err_vs_loop"] < 1e-5
    assert all(row[f"{m}_{p}_s"] > 0 for m in ("strong_loop", "default", "eager", "auto") for p in ("fwd", "fwdbwd"))
    assert (tmp_path / "d.md").read_text().startswith("# The default RNN(cell)")


def test_cells_are_checked(tmp_path):
    mod = load_script("bench_default")
    with pytest.raises(SystemExit, match="--cells"):
        mod.main(["--cells", "paragru,nope", "--out", str(tmp_path / "d.json")])
