"""The README's usage example runs as written (shortened sequence, same code)."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("torch.randn(4, 2048, 16)", "torch.randn(2, 128, 16)")
    code = code.replace("torch.randint(1, 2049, (4,))", "torch.randint(1, 129, (2,))")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    y, y_seq = scope["y"], scope["y_seq"]
    assert y.shape == (2, 128, 64)
    assert torch.allclose(y, y_seq, atol=1e-5)
    L = scope["lengths"]
    assert torch.allclose(scope["h_pad"], scope["y"][torch.arange(2), L - 1], atol=1e-5)


def test_readme_drop_in_example_runs(tmp_path, monkeypatch):
    """The torch.nn / saved-model example, shortened; torch.compile is covered by test_compile.py."""
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1]
    assert "pararnn.nn.GRU" in block and "save_pretrained" in block
    code = block.replace("512", "40").replace("300", "30").replace("(2, 256)", "(2, 16)")
    code = code.replace("torch.compile(model)", "model")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (4, 40, 128) and scope["h_n"].shape == (4, 4, 64)
    assert scope["tokens"].shape == (1, 52)
    assert (tmp_path / "my_model" / "config.json").is_file()


def test_readme_hugging_face_example_runs(tmp_path, monkeypatch):
    """The three-line Auto-class example loads a folder that PararnnForCausalLM.save_pretrained wrote."""
    import pytest

    pytest.importorskip("transformers")
    from pararnn.hf import PararnnConfig, PararnnForCausalLM

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3, "a README python block has no test"
    monkeypatch.chdir(tmp_path)
    PararnnForCausalLM(PararnnConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1)).save_pretrained("my_hf_model")
    scope: dict = {}
    exec(compile(blocks[2], "README.md", "exec"), scope)
    assert type(scope["model"]).__name__ == "PararnnForCausalLM"
