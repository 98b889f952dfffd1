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
    # (not -q: it silences the warnings that --strict turns into a failure)
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
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


def _api_objects():
    """``(name, object, is_class)`` for every object on the API page and the members it renders
    (its own public methods, or the ``members:`` list the page gives; ``members: false``: none)."""
    import importlib
    import inspect

    text = (ROOT / "docs" / "api.md").read_text()
    for m in re.finditer(r"^::: ([\w.]+)\n((?:    .*\n)*)", text, re.M):
        name, opts = m.group(1), m.group(2)
        module, _, attr = name.rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
        yield name, obj, inspect.isclass(obj)
        if not inspect.isclass(obj) or "members: false" in opts:
            continue
        listed = re.search(r"members: \[([^\]]*)\]", opts)
        members = [s.strip() for s in listed.group(1).split(",")] if listed else [
            k for k, v in vars(obj).items() if not k.startswith("_")
            and (inspect.isfunction(v) or isinstance(v, (classmethod, staticmethod, property)))]
        for k in members:
            yield f"{name}.{k}", getattr(obj, k), False


def test_every_api_object_has_args_and_returns():
    """The API reference renders docstrings: every function, class and method on it says what its
    arguments are (an Args or Attributes section) and what it returns (a Returns section, unless it
    returns None; a property's docstring says what it holds, as an attribute's does)."""
    import inspect

    missing = []
    for name, obj, is_class in _api_objects():
        if isinstance(obj, property):
            if not inspect.getdoc(obj.fget):
                missing.append(f"{name}: docstring")
            continue
        doc = inspect.getdoc(obj) or ""
        try:
            sig = inspect.signature(obj)
            params = [p for p in sig.parameters if p not in ("self", "cls")]
        except (TypeError, ValueError):
            sig, params = None, []
        if is_class and (issubclass(obj, (BaseException, Warning)) or not ("__init__" in vars(obj)
                                                                             or dataclasses.is_dataclass(obj))):
            params = []  # a constructor of a base class: documented there
        if params and not re.search(r"^(Args|Attributes):", doc, re.M):
            missing.append(f"{name}: Args")
        returns_none = sig is not None and sig.return_annotation in (None, "None")
        if not is_class and not returns_none and not re.search(r"^(Returns|Yields):", doc, re.M):
            missing.append(f"{name}: Returns")
    assert not missing, missing


def test_every_public_name_is_on_the_api_page():
    """Each function and class a public module exports (``__all__``) is in the API reference."""
    import importlib
    import inspect

    on_page = {name for name, _, _ in _api_objects()}
    absent = []
    for module in ("pararnn", "pararnn.nn", "pararnn.models", "pararnn.hf", "pararnn.fla", "pararnn.runtime", "pararnn.distributed"):
        mod = importlib.import_module(module)
        absent += [f"{module}.{n}" for n in mod.__all__ if f"{module}.{n}" not in on_page
                   and (inspect.isclass(getattr(mod, n)) or inspect.isfunction(getattr(mod, n)))]
    assert not absent, absent
