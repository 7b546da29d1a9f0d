"""The import graph: no cycle among the modules of ``pipelines`` and ``maskx_cli``, and the layers point one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "maskx_cli")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in the file (functions included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name and not name.startswith(t + "."):  # a package's own __init__ is not an edge
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_point_one_way():
    """The library never imports the CLI; stages import no other stage but the sweep's (the quick start
    runs the sweep, the sweep composes the stages); nothing below the stages imports a stage."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("pipelines"):
            assert not any(d.startswith("maskx_cli") for d in deps), mod
        stage_deps = {d for d in deps if d.startswith("pipelines.stages.")}
        if not mod.startswith("pipelines.stages"):
            assert not stage_deps or mod.startswith("maskx_cli"), (mod, stage_deps)
        elif mod == "pipelines.stages.quickstart":
            assert stage_deps == {"pipelines.stages.sweep"}
        elif mod != "pipelines.stages.sweep":
            assert not stage_deps, (mod, stage_deps)
    # CLI command modules are registered by main.py; none imports it
    assert not any("maskx_cli.main" in deps for mod, deps in graph.items() if mod != "maskx_cli.__main__")


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    names = sorted(m for m in _modules() if not m.endswith("__main__"))  # __main__ runs the app
    r = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]


def test_no_function_in_the_library_is_over_85_lines():
    """Functions of ``pipelines`` stay short enough to read at once (docstring included)."""
    long = []
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 85:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
