"""The feature-cache package ``pipelines/rois``: above ``engine`` (never imported by it), modules and functions of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.test_imports import import_graph

ROOT = Path(__file__).resolve().parents[1]


def test_engine_never_imports_the_cache_package_and_the_cache_never_imports_a_stage():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("pipelines.engine"):
            assert not any(d.startswith("pipelines.rois") for d in deps), (mod, deps)
        if mod.startswith("pipelines.rois"):
            assert not any(d.startswith(("pipelines.stages", "pipelines.evaluation", "maskx_cli")) for d in deps), (mod, deps)
    assert any(d.startswith("pipelines.rois") for d in graph["pipelines.stages.mask_train"])  # (the test reads real edges)


def test_cache_modules_and_functions_stay_small():
    for path in sorted((ROOT / "pipelines" / "rois").glob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 600, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 85, f"{path.name}:{node.name}"
