"""`pararnn bench` end to end on a tiny case: JSON with the machine, markdown table, plots."""
import json

from pararnn.cli import main


def test_bench_writes_json_table_and_plots(tmp_path):
    out = tmp_path / "b.json"
    main(["bench", "--no-engine", "--cells", "paragru,gru", "--Ts", "16,32", "--width", "8", "--repeats", "1",
          "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["torch"]
    rows = res["cells"]
    assert [(r["cell"], r["T"]) for r in rows] == [("paragru", 16), ("paragru", 32), ("gru", 16), ("gru", 32)]
    for r in rows:
        assert r["parallel_fwdbwd_s"] > 0 and r["sequential_fwd_s"] > 0 and r["max_abs_err_vs_sequential"] < 1e-4
        assert r["speedup_fwdbwd"] == r["sequential_fwdbwd_s"] / r["parallel_fwdbwd_s"]
    assert rows[2]["torch_fwd_s"] > 0 and "torch_fwd_s" not in rows[0]  # only GRU has a torch twin
    md = (tmp_path / "b.md").read_text()
    assert "| paragru | diagonal | 1 | 16 | 8 |" in md
    assert (tmp_path / "b_speedup.png").stat().st_size > 1000
    assert (tmp_path / "b_time_per_token.png").stat().st_size > 1000
