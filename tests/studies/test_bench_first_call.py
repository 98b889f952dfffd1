"""benchmarks/bench_first_call.py writes its JSON and table (the timed subprocess replaced by a
stand-in: the real one compiles for tens of seconds), and its case script is valid Python."""
import json

from helpers import load_script


def test_writes_results_for_every_case(tmp_path, monkeypatch):
    mod = load_script("bench_first_call")
    compile(mod.CASE, "<case>", "exec")
    caches = []
    monkeypatch.setattr(mod, "run_case", lambda case, threads, cache: caches.append(cache) or
                        {"seconds": len(caches) * 1.0, "again": 0.5})
    out = tmp_path / "f.json"
    mod.main(["--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["case"] for r in saved["rows"]] == list(mod.CASES)
    assert all(r["warm_s"] > r["cold_s"] > 0 and r["warm_again_s"] == r["cold_again_s"] == 0.5 for r in saved["rows"])
    assert caches[0] == caches[1] and caches[1] != caches[2]  # cold and warm share a cache; cases do not
    assert (tmp_path / "f.md").read_text().startswith("# First call in a fresh process")


def test_results_name_the_command_that_made_them(monkeypatch):
    from pararnn_studies.common import run_metadata

    monkeypatch.setattr("sys.argv", ["benchmarks/bench_first_call.py", "--threads", "1"])
    assert run_metadata({})["command"] == "python benchmarks/bench_first_call.py --threads 1"
    monkeypatch.setattr("sys.argv", ["/usr/bin/pararnn", "bench", "--quick"])
    assert run_metadata({})["command"] == "pararnn bench --quick"


def test_results_commit_ignores_the_results_folder(tmp_path):
    """A run writes its tracked results file after every case: that file does not make the run's
    commit "-dirty"; a changed source file does. Outside a checkout: None."""
    import subprocess

    from pararnn_studies.common import commit_of

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert commit_of(str(tmp_path)) is None
    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "r.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "results" / "r.json").write_text('{"rows": [1]}\n')
    assert commit_of(str(tmp_path / "results")) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert commit_of(str(tmp_path)) == head + "-dirty"
