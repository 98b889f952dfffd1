"""The package's import graph: no cycle (imports inside functions included), and every module
imports on its own."""
import ast
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(__file__), "..")


def _modules(package: str = "pararnn") -> dict[str, str]:
    out = {}
    root = os.path.join(REPO, package)
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = package + "." + os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _parents(mod: str) -> list[str]:
    """The packages a module's import runs first: ``a.b.c`` -> ``a.b`` (``a`` itself is left out)."""
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (relative or absolute)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                for cand in [target, *(f"{target}.{a.name}" for a in node.names)]:
                    if cand in mods:
                        deps.add(cand)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        # importing a.b.c runs package a.b first: an edge, unless a.b is being imported already (an ancestor)
        deps |= {p for dep in deps for p in _parents(dep) if p in mods and not mod.startswith(p + ".")}
        graph[mod] = deps - {mod, "pararnn"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["pararnn.rnn"]  # the analysis sees the package
    assert cycles(graph) == []


def test_the_engine_never_imports_its_clients():
    """Only ``python -m pararnn`` (the command) reaches the studies; no module of the library does."""
    for mod, path in _modules().items():
        if mod == "pararnn.__main__":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] == "pararnn_studies" for n in names), mod


def test_the_engine_never_imports_the_layers_and_integrations():
    """The engine (everything but models, nn, fla, hf, distributed) imports none of them: they are
    its clients (``pararnn/README.md``)."""
    clients = ("models", "nn", "fla", "hf", "distributed")
    for mod, deps in import_graph().items():
        if mod.split(".")[1:2] and mod.split(".")[1] in clients:
            continue
        assert not [d for d in deps if d.split(".")[1] in clients], (mod, deps)


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports_on_its_own():
    code = (
        "import importlib, sys\n"
        f"mods = {sorted((set(_modules()) | set(_modules('pararnn_studies'))) - {'pararnn.__main__', 'pararnn_studies.__main__'})!r}\n"  # (__main__ runs the command)
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k.split('.')[0] in ('pararnn', 'pararnn_studies')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(mods))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-3000:]
