"""pararnn track: task generators, metrics, resumable checkpoints, CLI errors, reconstruction."""
import json
import os

import pytest
import torch

from pararnn.studies import track
from pararnn.cli import main
from pararnn.studies.tasks import TASKS, permutation_group


@pytest.mark.parametrize("n, even, size", [(3, False, 6), (4, True, 12), (5, True, 60), (5, False, 120)])
def test_group_tables_are_groups(n, even, size):
    t = permutation_group(n, even)
    assert t.shape == (size, size)
    e = torch.arange(size)
    assert torch.equal(t[0], e) and torch.equal(t[:, 0], e)  # identity
    a, b, c = torch.randint(0, size, (3, 500))
    assert torch.equal(t[t[a, b], c], t[a, t[b, c]])  # associative
    assert all(len(set(row.tolist())) == size for row in t)  # Latin square: inverses exist


@pytest.mark.parametrize("name", list(TASKS))
def test_tasks_shapes_ranges_and_determinism(name):
    task = TASKS[name]
    x, y = task.sample(4, 33, torch.Generator().manual_seed(0))
    x2, y2 = task.sample(4, 33, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 33) and torch.equal(x, x2) and torch.equal(y, y2)
    assert 0 <= x.min() and x.max() < task.n_in and 0 <= y.min() and y.max() < task.n_out


def test_task_targets_by_hand():
    x, y = TASKS["parity"].sample(3, 20, torch.Generator().manual_seed(1))
    assert torch.equal(y, x.cumsum(1) % 2)
    x, y = TASKS["flipflop"].sample(2, 50, torch.Generator().manual_seed(2))
    for b in range(2):
        last = 0
        for t in range(50):
            last = int(x[b, t]) if x[b, t] < 2 else last
            assert y[b, t] == last
    x, y = TASKS["arith_mod5"].sample(2, 9, torch.Generator().manual_seed(3))
    for b in range(2):
        v = int(x[b, 0])
        for t in range(2, 9, 2):
            op, d = int(x[b, t - 1]), int(x[b, t])
            v = {5: v + d, 6: v - d, 7: v * d}[op] % 5
            assert y[b, t] == v and y[b, t - 1] == y[b, t - 2]


def test_accuracy_metrics():
    y = torch.tensor([[0, 1, 1], [1, 1, 0]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 0]])
    m = track.accuracy(pred, y, chance=0.5)
    assert m["acc"] == pytest.approx(5 / 6) and m["last_token_acc"] == 1.0 and m["sequence_acc"] == 0.5
    assert m["scaled_acc"] == pytest.approx((5 / 6 - 0.5) / 0.5)


ARGS = ["track", "--tasks", "parity", "--models", "diag_neg,paragru", "--steps", "3", "--eval-lengths", "50",
        "--jobs", "1"]


def test_study_writes_outputs_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "t")
    main(ARGS + ["--out", out])
    runs = sorted(os.listdir(os.path.join(out, "runs")))
    assert runs == ["parity__diag_neg__seed0.json", "parity__paragru__seed0.json"]
    for f in ("summary.json", "table.md", os.path.join("plots", "parity.png")):
        assert os.path.exists(os.path.join(out, f))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["pararnn"] and summary["date"] and summary["settings"]["steps"] == 3
    res = summary["runs"]
    assert {r["model"] for r in res} == {"diag_neg", "paragru"} and "50" in res[0]["eval"]
    mtimes = {r: os.path.getmtime(os.path.join(out, "runs", r)) for r in runs}
    capsys.readouterr()
    main(ARGS + ["--out", out])  # everything done: nothing is retrained
    assert "2 finished run(s)" in capsys.readouterr().err
    assert all(os.path.getmtime(os.path.join(out, "runs", r)) == m for r, m in mtimes.items())


def test_corrupt_checkpoint_is_moved_aside_and_rerun(tmp_path, capsys):
    out = str(tmp_path / "t")
    main(ARGS + ["--out", out])
    path = os.path.join(out, "runs", "parity__paragru__seed0.json")
    with open(path, "w") as f:
        f.write("{ not json")
    capsys.readouterr()
    main(ARGS + ["--out", out])
    err = capsys.readouterr().err
    assert "unreadable" in err and os.path.exists(path + ".corrupt")
    assert json.load(open(path))["model"] == "paragru"


@pytest.mark.parametrize("argv, match", [
    (["track", "--tasks", "parity,sorting"], "unknown task"),
    (["track", "--models", "transformer"], "unknown model"),
    (["track", "--seeds", "0"], "--seeds"),
    (["track", "--eval-lengths", "64,long"], "integers"),
])
def test_track_bad_flags(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        main(argv + ["--out", str(tmp_path / "t")])
    assert not os.path.exists(tmp_path / "t")


def test_reconstruction_small():
    rows = track.reconstruct([32], [1, 16], T=256, n_train=16, n_test=8)
    by = {(r["eigenvalues"], r["lag"]): r["nmse"] for r in rows}
    assert all(0 <= v < 1.1 for v in by.values())
    assert by[("complex", 1)] < 0.05 and by[("complex", 16)] < 0.1  # recent inputs read back
    assert by[("real", 16)] > 0.5  # real eigenvalues smear them together
    assert by[("complex", 16)] < by[("real", 16)] / 5


def test_other_configuration_is_refused_and_finished_runs_kept(tmp_path):
    out = str(tmp_path / "t")
    main(ARGS + ["--out", out])
    path = os.path.join(out, "runs", "parity__paragru__seed0.json")
    before = open(path).read()
    with pytest.raises(SystemExit, match="another configuration"):
        main([a if a != "3" else "4" for a in ARGS] + ["--out", out])  # --steps 4
    assert open(path).read() == before


def test_concurrent_study_on_one_folder_is_refused(tmp_path):
    out = str(tmp_path / "t")
    with track.study_lock(out):
        with pytest.raises(SystemExit, match="another study is running"):
            main(ARGS + ["--out", out])


def test_incomplete_checkpoint_is_moved_aside_and_rerun(tmp_path, capsys):
    out = str(tmp_path / "t")
    main(ARGS + ["--out", out])
    path = os.path.join(out, "runs", "parity__paragru__seed0.json")
    res = json.load(open(path))
    del res["mean_newton_iterations"]
    with open(path, "w") as f:
        json.dump(res, f)
    capsys.readouterr()
    main(ARGS + ["--out", out])
    assert "incomplete" in capsys.readouterr().err and os.path.exists(path + ".corrupt")
    assert "mean_newton_iterations" in json.load(open(path))


def test_subset_rerun_keeps_the_whole_summary(tmp_path):
    out = str(tmp_path / "t")
    main(ARGS + ["--out", out])
    main(["track", "--tasks", "parity", "--models", "paragru", "--steps", "3", "--eval-lengths", "50",
          "--jobs", "1", "--out", out])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert {r["model"] for r in summary["runs"]} == {"diag_neg", "paragru"}
    assert "diag_neg" in open(os.path.join(out, "table.md")).read()
