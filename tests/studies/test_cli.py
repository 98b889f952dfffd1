"""`pararnn bench` end to end on a tiny case: JSON with the machine, markdown table, plots."""
import json
import os

import pytest

from pararnn_studies.cli import main


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


def test_an_interrupted_bench_keeps_its_finished_measurements(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the per-cell study: the JSON holds the rows finished before it (marked
    incomplete), as the message says."""
    from pararnn_studies import bench

    calls, time_methods = [], bench.time_methods

    def interrupted_on_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return time_methods(*args, **kwargs)

    monkeypatch.setattr(bench, "time_methods", interrupted_on_the_second_case)
    out = tmp_path / "b.json"
    assert main(["bench", "--no-engine", "--cells", "paragru", "--Ts", "16,32", "--width", "4", "--repeats", "1",
                 "--out", str(out)]) == 130
    assert f"finished results are kept in {out}" in capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["complete"] is False and [(r["cell"], r["T"]) for r in res["cells"]] == [("paragru", 16)]
    main(["bench", "--no-engine", "--cells", "paragru", "--Ts", "16", "--width", "4", "--repeats", "1",
          "--out", str(out)])
    assert json.loads(out.read_text())["complete"] is True


def _run(*argv, timeout=60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)


def test_help_version_and_typo_answer_without_importing_torch():
    code = ("import sys; from pararnn_studies.cli import main\n"
            "for argv in (['--help'], ['--version'], ['bench', '--help'], ['bnech']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'the CLI imported torch'\n")
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert "pararnn 0." in r.stdout and "invalid choice: 'bnech'" in r.stderr


def test_python_dash_m_and_distributed_reachable():
    r = _run("-m", "pararnn", "--version")
    assert r.returncode == 0 and r.stdout.startswith("pararnn ")
    r = _run("-c", "import pararnn; print(pararnn.distributed.allreduce_gradients.__name__)")
    assert r.returncode == 0 and "allreduce_gradients" in r.stdout, r.stderr


def test_process_group_finds_the_sequence_parallel_context_by_itself():
    code = ("import sys, torch.distributed as dist\n"
            "from pararnn.parallel import context_for\n"
            "assert 'pararnn.distributed' not in sys.modules\n"
            "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
            "print(type(context_for(dist.group.WORLD)).__name__)\n")
    r = _run("-c", code)
    assert r.returncode == 0 and "SequenceParallel" in r.stdout, r.stderr[-500:]


def test_cli_name_lists_match_the_code():
    from pararnn_studies import cli
    from pararnn.models import CELLS
    from pararnn_studies.tasks import TASKS
    from pararnn_studies.track import MODELS

    assert cli.CELL_NAMES == tuple(CELLS)
    assert cli.TASK_NAMES == tuple(TASKS)
    assert cli.MODEL_NAMES == tuple(MODELS)
    from pararnn_studies import lm

    assert cli.LM_MODEL_NAMES == tuple(lm.MODELS)


def test_bench_json_records_version_commit_date_and_settings_used(tmp_path):
    out = tmp_path / "b.json"
    main(["bench", "--no-engine", "--cells", "paragru", "--Ts", "16", "--width", "4", "--repeats", "1",
          "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["pararnn"] and res["date"] and "commit" in res
    assert res["settings"]["Ts"] == [16] and res["settings"]["width"] == 4 and res["settings"]["cells"] == ["paragru"]
    assert res["elapsed_s"] > 0 and f"the run took {res['elapsed_s']:.0f} s" in (tmp_path / "b.md").read_text()


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    import pytest

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (["bench", "--out", str(blocker / "b.json")], ["track", "--out", str(blocker / "t")],
                 ["bench", "--out", "/proc/b.json"]):
        with pytest.raises(SystemExit, match="cannot write --out"):
            main(argv)


def test_engine_regime_row_times_every_method_and_tabulates():
    """One tiny engine regime: every method timed forward and forward+backward (the compiled ones
    included), the one-off compile times recorded, and the markdown table built from the row."""
    from pararnn_studies.bench import bench_regime, table

    row = bench_regime(2, 80, 4, repeats=1)
    for m in ("strong_loop", "sequential", "parallel", "parallel_eager", "parallel_compiled", "parallel_bf16"):
        assert row[f"{m}_fwd_s"] > 0 and row[f"{m}_fwdbwd_s"] > 0, m
    assert row["compile_s"] > 0 and row["compile_cell_s"] > 0
    assert row["max_abs_err_vs_sequential"] < 1e-4
    assert "compile_cell=False" in table([row])


def test_bench_jax_skips_cleanly_without_jax(tmp_path):
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("jax") is not None:
        pytest.skip("jax is installed: the comparison itself is a benchmark, not a test")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_jax.py")
    out = subprocess.run([sys.executable, script, "--out", str(tmp_path / "j.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "skipped" in out.stdout
    assert not (tmp_path / "j.json").exists()


def test_interleaved_medians_runs_whole_turns_and_reports_per_call():
    """min_turn_s: each turn repeats its callable k times (k from the faster of two sizing calls,
    so a slow first call, a compile, does not make one-call turns) and records the mean per call;
    without it, one call per turn."""
    import time

    from pararnn.utils.timing import interleaved_medians

    calls = {"slow": 0, "fast": 0}

    def make(name, seconds):
        def fn():
            calls[name] += 1
            time.sleep(0.2 if calls[name] == 1 else seconds)  # the first call "compiles"
        return fn

    fns = {"slow": make("slow", 0.02), "fast": make("fast", 0.002)}
    t = interleaved_medians(fns, repeats=3)
    assert calls == {"slow": 3, "fast": 3}
    calls.update(slow=0, fast=0)
    t = interleaved_medians(fns, repeats=3, min_turn_s=0.01)
    assert calls["slow"] == 2 + 3  # the sizing calls, then one per turn
    assert 2 + 3 * 2 <= calls["fast"] <= 2 + 3 * 5  # turns of several calls (sleep overshoots on a busy machine)
    assert 0.002 <= t["fast"] < 0.01 and 0.02 <= t["slow"] < 0.1  # seconds per call, not per turn


def test_studies_run_without_tqdm_and_matplotlib(monkeypatch, tmp_path, capsys):
    """The library does not depend on tqdm or matplotlib: without them the studies print plain
    progress lines and skip plots (one note), and nothing raises."""
    import sys

    from pararnn_studies import common

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(common, "_SKIPPED_PLOTS", [])
    assert list(common.progress_bar(range(3), desc="steps")) == [0, 1, 2]
    bar = common.progress_bar(total=2, desc="runs")
    bar.update(), bar.update(), bar.close()
    for name in ("a.png", "b.png"):
        with common.figure(str(tmp_path / name)) as ax:
            ax.plot([1, 2], [3, 4], label="x")
            ax.set_xscale("log")
    err = capsys.readouterr().err
    assert "steps: 3/3" in err and "runs: 2/2" in err
    assert err.count("matplotlib is not installed") == 1 and not list(tmp_path.iterdir())
