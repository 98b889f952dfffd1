"""The code's shape: short functions where the engine's logic lives, and every stopping rule of
Newton's loop read in one method."""
import ast
import pathlib

import pararnn

ROOT = pathlib.Path(pararnn.__file__).parent
MOST_LINES = 60  # a function, docstring included
CHECKED = ["solver/*.py", "rnn.py", "autograd.py", "chunking.py", "inputs.py"]


def long_functions(source: str, most: int) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function (methods included) longer than ``most`` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > most:
                out.append((node.name, n))
    return out


def test_no_long_function_in_the_solver_and_the_module():
    files = [p for pattern in CHECKED for p in sorted(ROOT.glob(pattern))]
    assert len(files) > 10
    found = {str(p.relative_to(ROOT)): long_functions(p.read_text(), MOST_LINES) for p in files}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_length_check_can_fail():
    body = "\n".join(f"    x{i} = {i}" for i in range(MOST_LINES))
    assert long_functions(f"def f():\n{body}\n", MOST_LINES) == [("f", MOST_LINES + 1)]


def _uses(tree: ast.AST, names: set[str]) -> dict[str, set[str]]:
    """Function name -> which of ``names`` (a constant or an attribute) it reads."""
    out = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            seen = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and n.id in names}
            seen |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and n.attr in names}
            if seen:
                out[fn.name] = seen
    return out


def test_stopping_rules_are_read_in_one_method():
    """The tolerances, stall ratios and max_iters are read by NewtonSolver.decide alone (and the
    correction check, which decide's caller runs only where decide says "converged")."""
    rules = {"ROUNDING_FLOOR", "STALL_RATIO", "SWEEP_STALL", "rtol", "max_iters"}
    uses = _uses(ast.parse((ROOT / "solver" / "newton.py").read_text()), rules)
    assert "decide" in uses and uses["decide"] >= {"ROUNDING_FLOOR", "STALL_RATIO", "SWEEP_STALL", "rtol",
                                                    "max_iters"}
    assert set(uses) <= {"decide", "correction_check", "correction_at_floor", "run", "__init__"}, uses
    # run may read max_iters only to skip the correction check in the last allowed iteration
    assert uses.get("run", set()) <= {"max_iters"}
