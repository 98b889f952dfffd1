"""The documentation: the site builds with no warning, the options table covers every solver
option, the README stays short, and every Python block of the README and docs runs."""
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import pararnn

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
# Sizes shrunk for the suite (the same code, shorter sequences), and what a block needs from the page.
SHRINK = {"2048": "96", "2049": "97", "4096": "32", "512": "40", "300": "30", "(2, 256)": "(2, 16)", "(4, 256, 16)": "(2, 64, 16)",
          "torch.compile(model)": "model"}
PREAMBLE = ("import torch, pararnn\nfrom pararnn.models import ParaGRU\n"
            "cell, x = ParaGRU(4, 8), torch.randn(2, 64, 4)\n")


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page or a reference that does not resolve fails."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("SolverOptions") > 3


def test_options_table_covers_every_solver_option():
    rows = re.findall(r"^\| `(\w+)` \|", (ROOT / "docs" / "options.md").read_text(), flags=re.M)
    fields = [f.name for f in dataclasses.fields(pararnn.SolverOptions)]
    assert sorted(rows) == sorted(fields)
    defaults = {f.name: f.default for f in dataclasses.fields(pararnn.SolverOptions)}
    table = (ROOT / "docs" / "options.md").read_text()
    for name, default in defaults.items():  # the default the table states is the code's
        shown = re.search(rf"^\| `{name}` \| `([^`]+)`", table, flags=re.M).group(1)
        assert eval(shown) == default, name  # `None`, `"auto"`, `1 << 30`, ...


def test_readme_is_short_and_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)", text):
        assert (ROOT / target).exists(), target


@pytest.mark.parametrize("page", [p.name for p in PAGES if python_blocks(p)])
def test_every_python_block_of_the_docs_runs(page, tmp_path, monkeypatch):
    """Each page's Python blocks run in order in one scope (sizes shrunk)."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(PREAMBLE, scope)
    for block in python_blocks(ROOT / "docs" / page):
        for a, b in SHRINK.items():
            block = block.replace(a, b)
        exec(compile(block, page, "exec"), scope)
    torch.manual_seed(0)
