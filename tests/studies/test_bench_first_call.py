"""benchmarks/bench_first_call.py writes its JSON and table (the timed subprocess replaced by a
stand-in: the real one compiles for tens of seconds), and its case script is valid Python."""
import json

from helpers import load_script


def test_writes_results_for_every_case(tmp_path, monkeypatch):
    mod = load_script("bench_first_call")
    compile(mod.CASE, "<case>", "exec")
    caches = []
    monkeypatch.setattr(mod, "run_case", lambda case, threads, cache: caches.append(cache) or len(caches) * 1.0)
    out = tmp_path / "f.json"
    mod.main(["--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["case"] for r in saved["rows"]] == list(mod.CASES)
    assert all(r["warm_s"] > r["cold_s"] > 0 for r in saved["rows"])
    assert caches[0] == caches[1] and caches[1] != caches[2]  # cold and warm share a cache; cases do not
    assert (tmp_path / "f.md").read_text().startswith("# First call in a fresh process")


def test_results_name_the_command_that_made_them(monkeypatch):
    from pararnn_studies.common import run_metadata

    monkeypatch.setattr("sys.argv", ["benchmarks/bench_first_call.py", "--threads", "1"])
    assert run_metadata({})["command"] == "python benchmarks/bench_first_call.py --threads 1"
    monkeypatch.setattr("sys.argv", ["/usr/bin/pararnn", "bench", "--quick"])
    assert run_metadata({})["command"] == "pararnn bench --quick"
