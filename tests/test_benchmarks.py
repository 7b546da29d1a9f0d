"""The GPU check script's CPU path: every benchmark it runs works with --device cpu at tiny sizes and
writes its JSON (the figures themselves come from real runs, docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


COMMAND_STEPS = ["world", "detect-train", "export-embeddings", "cache-build", "mask-train-streamed", "train-e2e", "seeded-checkpoint",
                 "detect-import", "eval-run", "predict-visualize", "eval-results", "torchrun", "resume-after-sigterm"]


def gpu_check(tmp_path, skip: str, budget: int = 1500) -> tuple[Path, dict]:
    """``SMOKE=1 DEVICE=cpu bash benchmarks/gpu_check.sh OUT`` with ``SKIP=skip``: OUT and its summary."""
    env = {**os.environ, "SMOKE": "1", "DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "LIMIT": "400",
           "SKIP": skip, "BUDGET": str(budget)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=budget + 100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    return out, json.loads((out / "summary.json").read_text())


def test_gpu_acceptance_smoke_runs_every_command_on_cpu(tmp_path):
    out, summary = gpu_check(tmp_path, skip="benchmarks")
    assert summary["ok"] and summary["mode"] == "smoke" and summary["device"] == "cpu" and summary["amp"] == "off"
    assert summary["skipped_groups"] == ["benchmarks"] and summary["missing"] == [] and summary["without"] == {}
    m = summary["machine"]
    assert m["device"] == "cpu" and m["torch"] and m["torchvision"] and m["python"] and m["cpu"] and "gpu" not in m
    assert summary["packages"]["pycocotools"] and summary["packages"]["faster-coco-eval"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == COMMAND_STEPS
    assert summary["counts"] == {"ok": len(COMMAND_STEPS), "failed": 0, "timeout": 0, "skipped": 0, "not run": 0}
    for s in steps.values():
        assert s["status"] == "ok" and s["exit_status"] == 0 and s["seconds"] > 0, s
        assert s["last_line"] and (out / s["log"]).is_file() and s["command"]
    assert steps["detect-train"]["iterations"] == 4 and steps["detect-train"]["it_per_s"] > 0
    assert "--set solver.amp=off" in steps["detect-train"]["command"]
    assert steps["mask-train-streamed"]["streamed"] and "--ram-budget-gb 0" in steps["mask-train-streamed"]["command"]
    assert steps["predict-visualize"]["pictures"] == 4
    assert steps["torchrun"]["world_size"] == 1 and steps["torchrun"]["backend"] == "gloo"
    assert "--nproc-per-node 1" in steps["torchrun"]["command"]
    r = steps["resume-after-sigterm"]
    assert r["stopped"]["exit_status"] == 2 and r["stopped"]["stopped_by_sigterm"] and r["resumed"]["exit_status"] == 0
    assert r["last_logged_iteration"] == 8
    assert "detector.min_size=800" in steps["detect-import"]["command"]
    assert "--results" in steps["eval-results"]["command"] and "--visualize" in steps["predict-visualize"]["command"]
    assert "torch" in (out / "versions.txt").read_text()


def load_acceptance():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_acceptance_says_what_is_missing_and_skips_what_needs_it(tmp_path):
    acc = load_acceptance()
    found = {dist: "1.0" for dist in acc.PACKAGES.values()} | {"pycocotools": None, "faster-coco-eval": None, "lvis": None}
    notes = acc.missing_notes(found)
    assert set(notes) == {"pycocotools", "faster-coco-eval", "lvis"} and "skipped" in notes["pycocotools"]
    assert "--backend reference" in notes["faster-coco-eval"]
    steps = {s.name: s for s in acc.command_steps(acc.SIZES["smoke"], tmp_path, "cpu", found, "off")}
    assert list(steps) == COMMAND_STEPS
    rec = acc.run_step(steps["world"], tmp_path, time.monotonic() + 100, found, False, dict(os.environ))
    assert rec["status"] == "skipped" and rec["exit_status"] is None and rec["reason"] == "needs pycocotools, not installed"
    assert steps["seeded-checkpoint"].needs == ()
    for name in ("eval-run", "eval-results"):
        assert steps[name].argv[-4:-2] == ["--backend", "reference"]
    everything = {dist: "1.0" for dist in acc.PACKAGES.values()}
    rec = acc.run_step(steps["world"], tmp_path, time.monotonic(), everything, False, dict(os.environ))
    assert rec["status"] == "not run" and rec["reason"] == "the time budget ran out"
    assert "--backend" not in acc.command_steps(acc.SIZES["full"], tmp_path, "cuda", everything, "bf16")[8].argv


def test_gpu_check_script_runs_every_benchmark_on_cpu_and_writes_json(tmp_path):
    out, summary = gpu_check(tmp_path, skip="commands")
    names = ["stage2", "inference", "classes", "cache", "coco_projection"]
    assert summary["ok"] and [s["name"] for s in summary["steps"]] == names
    assert all(s["exit_status"] == 0 for s in summary["steps"])
    assert "torch" in (out / "versions.txt").read_text()
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in names}
    for r in reports.values():
        assert r["machine"]["device"] == "cpu" and r["machine"]["torch"]
    routes = [x["route"] for x in reports["stage2"]["settings"][0]["results"]]
    assert routes[0].startswith("limit") and "cache, streamed from disk (fp16)" in routes and len(routes) == 5
    assert all(x["rois_per_s"] > 0 for x in reports["stage2"]["settings"][0]["results"])
    assert reports["inference"]["same_boxes"] and len(reports["inference"]["rows"]) == 3
    assert [x["classes"] for x in reports["classes"]["mask_inference"]] == [80, 3000]
    reader, build = reports["cache"]["reader"], reports["cache"]["build"]
    assert reader["stream_cold"]["rows"] > 0 and reader["dd_cold"]["mb_per_s"] > 0
    assert reader["two_warm"]["each_row_once"] and reader["two_cold"]["bytes_read"] <= reader["file_bytes"]
    assert build["images"] == 2 and build["inference_images_per_s"] > 0 and build["build_images_per_s"] > 0
    assert not list(out.glob("bench_cache_*"))  # the benchmark's cache files are gone
    sizes = reports["coco_projection"]  # smoke: the size table's arithmetic only, no rates measured
    assert sizes["rates"] is None and len(sizes["rows"]) == 12
    assert [(r["fg_per_image"], r["rois"], r["roi_bytes"]) for r in sizes["rows"][:4]] == [
        (20, 4_690_640, 52_030), (10, 2_345_320, 101_182), (40, 9_381_280, 52_030), (128, 30_020_096, 101_182)]


def test_a_benchmark_asked_for_cuda_without_a_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_classes.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --device cuda: no CUDA device is visible to torch"
