"""The GPU check script's CPU path: every benchmark it runs works with --device cpu at tiny sizes and
writes its JSON (the figures themselves come from real runs, docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_script_runs_every_benchmark_on_cpu_and_writes_json(tmp_path):
    env = {**os.environ, "SMOKE": "1", "DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "LIMIT": "400"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    assert "torch" in (out / "versions.txt").read_text()
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in ("stage2", "inference", "classes", "cache")}
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


def test_a_benchmark_asked_for_cuda_without_a_gpu_says_so_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_classes.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --device cuda: no CUDA device is visible to torch"
