"""benchmarks/bench_auto.py --grid: what mode="auto" takes is judged against the faster module,
and an interrupted run resumes without redoing its cases."""
import json

from helpers import load_script


def test_grid_judges_auto_and_resumes(tmp_path, monkeypatch):
    mod = load_script("bench_auto")
    monkeypatch.setattr(mod, "GRID", [("paragru", 2, 8, 96), ("step_only", 1, 8, 96)])
    out = tmp_path / "g.json"
    assert mod.main(["--grid", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["cell"], r["B"], r["T"], r["d"]) for r in rows] == [("paragru", 2, 96, 8), ("step_only", 1, 96, 8)]
    for r in rows:
        for bw in ("fwd", "fwdbwd"):
            assert r[f"pick_{bw}"] in ("sequential", "parallel")
            faster = min(r[f"sequential_{bw}_s"], r[f"parallel_{bw}_s"])
            assert r[f"regret_{bw}"] == r[f"{r[f'pick_{bw}']}_{bw}_s"] / faster >= 1.0
    assert "auto within 5 % of the faster module:" in (tmp_path / "g.md").read_text()

    monkeypatch.setattr(mod, "GRID", [*mod.GRID, ("paralstm", 1, 8, 96)])
    monkeypatch.setattr(mod, "grid_case", lambda *a: (_ for _ in ()).throw(AssertionError(a)) if a[0] != "paralstm"
                        else {**rows[0], "cell": "paralstm", "B": 1})
    assert mod.main(["--grid", "--resume", "--repeats", "1", "--out", str(out)]) == 0  # only the new case runs
    assert [r["cell"] for r in json.loads(out.read_text())["rows"]] == ["paragru", "step_only", "paralstm"]


def test_grid_cells_selects_a_subset(tmp_path, monkeypatch):
    import pytest

    mod = load_script("bench_auto")
    monkeypatch.setattr(mod, "GRID", [("paragru", 2, 8, 96), ("step_only", 1, 8, 96)])
    ran = []
    monkeypatch.setattr(mod, "grid_case", lambda *a: ran.append(a[0]) or {"cell": a[0], "B": a[1], "T": a[2], "d": a[3]})
    monkeypatch.setattr(mod, "grid_table", lambda rows: "table")
    assert mod.main(["--grid", "--cells", "step_only", "--out", str(tmp_path / "g.json")]) == 0
    assert ran == ["step_only"]
    with pytest.raises(SystemExit, match="--cells"):
        mod.main(["--grid", "--cells", "gru", "--out", str(tmp_path / "h.json")])


def test_grid_work_selects_the_cases_of_one_work_per_step(tmp_path, monkeypatch):
    import pytest

    mod = load_script("bench_auto")
    ran = []
    monkeypatch.setattr(mod, "grid_case", lambda *a: ran.append(a[:4]) or {"cell": a[0], "B": a[1], "T": a[2], "d": a[3]})
    monkeypatch.setattr(mod, "grid_table", lambda rows: "table")
    assert mod.main(["--grid", "--work", "8192", "--out", str(tmp_path / "g.json")]) == 0
    # ParaGRU and the step-only cell at B·d·8 = 8192, ParaLSTM (Block(2)) at B·d·32
    assert sorted({(c, B, d) for c, B, T, d in ran}) == [
        ("paragru", 8, 128), ("paragru", 32, 32), ("paralstm", 8, 32), ("step_only", 8, 128), ("step_only", 32, 32)]
    with pytest.raises(SystemExit, match="--work"):
        mod.main(["--grid", "--work", "lots", "--out", str(tmp_path / "h.json")])
