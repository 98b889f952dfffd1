"""pararnn lm: the corpus, equal-size models, a tiny study end to end, resuming, bad flags."""
import json
import os

import pytest
import torch

from pararnn_studies.cli import main
from pararnn_studies import lm

TINY = ["lm", "--quick", "--params", "20000", "--steps", "2", "--models", "paragru,transformer"]


def test_corpus_is_the_fixed_stdlib_files():
    data, info = lm.load_corpus()
    assert info["files"] and not info["missing"] and info["python"]
    assert data.dtype == torch.long and 0 <= int(data.min()) and int(data.max()) < 256
    assert len(data) == info["bytes"] > 100_000
    with open(os.path.join(info["stdlib"], info["files"][0]), "rb") as f:
        first = f.read()
    assert bytes(data[:len(first)].tolist()) == first


def test_models_have_about_the_target_size():
    cfg = lm.LMConfig(params=200_000)
    for name in lm.MODELS:
        n = lm.n_params(lm.build(name, lm.width_for(name, cfg), cfg))
        assert abs(n - cfg.params) / cfg.params < 0.15, (name, n)


def test_transformer_is_causal():
    torch.manual_seed(0)
    m = lm.TransformerLM(256, 16, 1, 32)
    x = torch.randint(0, 256, (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 256  # change the future only
    torch.testing.assert_close(m(x)[0][:, :7], m(y)[0][:, :7])


def test_lm_study_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path / "lm")
    main(TINY + ["--out", out])
    for f in ("summary.json", "table.md", os.path.join("plots", "loss.png"), os.path.join("plots", "newton.png"),
              os.path.join("runs", "paragru.json")):
        assert os.path.exists(os.path.join(out, f)), f
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["corpus"]["python"] and s["date"] and "commit" in s and s["machine"]
    runs = {r["model"]: r for r in s["runs"]}
    assert set(runs) == {"paragru", "transformer"}
    r = runs["paragru"]
    assert r["val_bits_per_byte"] > 0 and r["train_tokens_per_s"] > 0 and len(r["loss_curve"]) == 2
    assert len(r["newton_curve"]) == 2 and max(r["newton_curve"]) == r["newton_iterations_max"]
    assert r["newton_iterations_max"] >= 1 and r["timing"]["sequential_step_s"] > 0 and r["sample"].startswith("def ")
    assert runs["transformer"]["timing"] is None
    capsys.readouterr()
    main(TINY + ["--out", out])  # finished models are not retrained
    assert "already finished" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [(["lm", "--models", "mamba"], "unknown model"),
                                         (["lm", "--steps", "0"], "--steps")])
def test_lm_bad_flags(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        main(argv + ["--out", str(tmp_path / "x")])
