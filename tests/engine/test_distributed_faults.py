"""``torchrun --nproc_per_node 2 --no-python maskx train`` (gloo, CPU): set A = voc trains, a rank-0 write
failure ends both processes at once with one error line each, and ``--resume`` after it reaches the
weights of the uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.checkpoint import load_checkpoint
from tests.engine.tiny_runs import cli_overrides, make_world

pytestmark = pytest.mark.slow


def torchrun_maskx(args: list[str], timeout: float = 400) -> tuple[int, list[tuple[float, str]], float]:
    """Run ``maskx ARGS`` in 2 torchrun processes; (exit status, stderr lines with the time each was read, end time)."""
    maskx = str(Path(sys.executable).parent / "maskx")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python", maskx, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), s.rstrip("\n")) for s in proc.stderr))
    reader.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()
        reader.join()
    return proc.returncode, lines, time.monotonic()


def test_torchrun_train_set_a_voc_rank0_write_failure_and_bit_identical_resume(tmp_path):
    world = make_world(tmp_path, train_images=8, val_images=1)
    settings = cli_overrides(world, "solver.iterations=4", "solver.batch_size=2", "solver.checkpoint_every=2",
                             "data.mask_classes=voc", "detector.backbone=resnet18", "head.mask_dim=16", "head.mlp_hidden=32",
                             "head.transfer_hidden=32")
    full, broken = tmp_path / "full", tmp_path / "broken"

    rc, lines, _ = torchrun_maskx(["train", "--config", "synthetic", "--out", str(full), *settings])
    assert rc == 0, "\n".join(s for _, s in lines)[-3000:]
    assert json.loads((full / "manifest.json").read_text())["status"] == "finished"

    # rank 0 cannot write model_final.pth at the end (a folder is in its place); nothing else is wrong
    (broken / "model_final.pth").mkdir(parents=True)
    rc, lines, end = torchrun_maskx(["train", "--config", "synthetic", "--out", str(broken), *settings])
    text = "\n".join(s for _, s in lines)
    errors = [(t, s) for t, s in lines if s.startswith("error:")]
    assert rc != 0
    assert [s for _, s in errors if not s.startswith("error: rank 1:")] == [
        f"error: {broken / 'model_final.pth'}: could not be written: Is a directory"], text
    assert [s for _, s in errors if s.startswith("error: rank 1:")] == [
        "error: rank 1: stopped because rank 0 failed: its error line says why"], text
    assert not re.search(r'File ".*(pipelines|maskx_cli)/', text), text  # no traceback of maskx's own code
    assert end - errors[0][0] < 60  # both processes end at once, not after MASKX_DIST_TIMEOUT_MINUTES
    assert json.loads((broken / "manifest.json").read_text())["status"] == "failed"
    assert load_checkpoint(broken / "last.pth")["iteration"] == 2

    (broken / "model_final.pth").rmdir()
    rc, lines, _ = torchrun_maskx(["train", "--config", "synthetic", "--out", str(broken), "--resume", *settings])
    assert rc == 0, "\n".join(s for _, s in lines)[-3000:]
    for name in ("model_final.pth", "mask_final.pth"):
        a, b = load_checkpoint(full / name)["model"], load_checkpoint(broken / name)["model"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert load_checkpoint(broken / "mask_final.pth")["set_a"] == load_checkpoint(full / "mask_final.pth")["set_a"]
    assert len(load_checkpoint(full / "mask_final.pth")["set_a"]) == 20  # voc
    metrics = [json.loads(s) for s in (broken / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [json.loads(s) for s in (full / "metrics.jsonl").read_text().splitlines()]


def test_a_backend_error_about_a_lost_process_becomes_its_reason():
    from pipelines.engine.distributed import _collective_failure

    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:34010. This is typically caused by a remote worker crashing. Check the logs")
    assert _collective_failure(gloo) == "Connection closed by peer [127.0.0.1]:34010"
    timeout = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3600000ms for "
                           "recv operation to complete")
    assert _collective_failure(timeout) == "Timed out waiting 3600000ms for recv operation to complete"
    assert _collective_failure(RuntimeError("shape mismatch")) is None
    assert _collective_failure(ValueError("Connection closed by peer")) is None
