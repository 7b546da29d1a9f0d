"""The import graph: no cycle among the modules of ``pipelines`` and ``maskx_cli``, the layers point one way; short functions and modules."""

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


# The package order (docs/architecture.md, "The layers"), lowest first: a module imports modules of its
# own layer or of layers below it, never above. "pipelines" is the foundation: the package's own
# modules (errors, io, progress, config, checkpoint, visualize); a module belongs to the longest name
# here that it starts with. Adding a package is one line.
LAYERS = (
    "pipelines",
    "pipelines.data",
    "pipelines.modeling",
    "pipelines.engine",
    "pipelines.rois",  # the stage-2 feature cache: it may import engine, engine never imports it
    "pipelines.evaluation",
    "pipelines.stages",
    "pipelines.api",
    "maskx_cli",
)
SWEEP = {"pipelines.stages.sweep", "pipelines.stages.sweep_rows", "pipelines.stages.sweep_spec"}  # compose the stages


def layer_of(module: str) -> int:
    matches = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    assert matches, f"{module} is in no layer of LAYERS"
    return max(matches, key=lambda i: len(LAYERS[i]))


def back_edges(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module of a higher layer than the importer's, as ``"a -> b"``."""
    return [f"{mod} -> {dep}" for mod, deps in sorted(graph.items()) for dep in sorted(deps) if layer_of(dep) > layer_of(mod)]


def test_packages_import_downwards_only():
    assert back_edges(import_graph()) == []


def test_back_edge_finder_finds_one():
    assert back_edges({"pipelines.engine.cache": {"pipelines.rois.store"}, "pipelines.rois.store": {"pipelines.engine.run_dir"}}) == [
        "pipelines.engine.cache -> pipelines.rois.store"]
    assert back_edges({"pipelines.modeling.zoo": {"pipelines.checkpoint"}}) == []  # the foundation is below everything
    assert back_edges({"pipelines.rois.sources": {"pipelines.stages.mask_train"}}) == ["pipelines.rois.sources -> pipelines.stages.mask_train"]
    assert back_edges({"pipelines.io": {"pipelines.data.coco"}}) == ["pipelines.io -> pipelines.data.coco"]
    assert back_edges({"pipelines.evaluation.report": {"pipelines.api"}}) == ["pipelines.evaluation.report -> pipelines.api"]


def test_stages_import_no_other_stage_but_the_sweeps():
    """Stages import no other stage but the sweep's modules (the quick start runs the sweep, the sweep
    composes the stages); the CLI's command modules never import the module that registers them."""
    graph = import_graph()
    for mod, deps in graph.items():
        stage_deps = {d for d in deps if d.startswith("pipelines.stages.")}
        if mod == "pipelines.stages.quickstart":
            assert stage_deps <= SWEEP, (mod, stage_deps)
        elif mod in SWEEP:
            assert "pipelines.stages.quickstart" not in stage_deps, mod
        elif mod.startswith("pipelines.stages."):
            assert not stage_deps, (mod, stage_deps)
    assert not any("maskx_cli.main" in deps for mod, deps in graph.items() if mod != "maskx_cli.__main__")


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    names = sorted(m for m in _modules() if not m.endswith("__main__"))  # __main__ runs the app
    r = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1:]


def test_no_function_is_over_85_lines():
    """Functions of ``pipelines`` and ``maskx_cli`` stay short enough to read at once (docstring included)."""
    long = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 85:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_no_library_module_is_over_600_lines():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in sorted((ROOT / "pipelines").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long
