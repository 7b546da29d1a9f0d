"""Faults: SIGTERM from outside, a non-finite loss, a full disk, an unwritable output folder."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.config import SolverConfig
from pipelines.checkpoint import load_checkpoint
from pipelines.engine.loop import Trainer
from pipelines.errors import MaskxError
from tests.engine.tiny_runs import cli_overrides, make_world


def solver(**kw) -> SolverConfig:
    base = dict(iterations=8, warmup_iters=0, lr=0.1, batch_size=4, reference_batch_size=4, checkpoint_every=3,
                log_every=1, device="cpu")
    return SolverConfig(**{**base, **kw})


def regression_step(model, bad_at: int | None = None):
    """A least-squares step on fixed data; the loss is NaN at iteration ``bad_at``."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)

    def step(it: int) -> dict[str, torch.Tensor]:
        loss = ((model(x) - y) ** 2).mean()
        return {"loss_l2": loss * float("nan") if it == bad_at else loss}

    return step


def test_non_finite_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    trainer = Trainer(model, solver(), tmp_path, "test")
    with pytest.raises(MaskxError, match=r"loss became non-finite \(nan\) at iteration 4; stopped, the last good checkpoint"):
        trainer.run(regression_step(model, bad_at=4))
    ckpt = load_checkpoint(tmp_path / "last.pth", "test")
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4]  # the NaN step is neither applied nor logged
    assert all(math.isfinite(r["loss"]) for r in lines)
    assert torch.isfinite(model.weight).all()  # the optimizer never stepped on the NaN


def test_non_finite_loss_before_any_checkpoint_says_there_is_none(tmp_path):
    model = torch.nn.Linear(4, 1)
    with pytest.raises(MaskxError, match=r"at iteration 1; stopped, no checkpoint had been written yet — lower the"):
        Trainer(model, solver(), tmp_path, "test").run(regression_step(model, bad_at=1))
    assert not (tmp_path / "last.pth").exists()


def test_full_disk_gives_clear_error_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 1)
    trainer = Trainer(model, solver(), tmp_path, "test")
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint at iteration 6 meets a full disk half-way
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(MaskxError, match="could not be written: No space left on device") as exc:
        trainer.run(regression_step(model))
    assert exc.value.path == str(tmp_path / "last.pth")
    assert load_checkpoint(tmp_path / "last.pth")["iteration"] == 3  # the previous one, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth", "metrics.jsonl", "tb"]  # no temporary file left


def test_unwritable_output_folder_gives_one_error_line(tmp_path):
    world = make_world(tmp_path, train_images=4, val_images=1)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(app, ["detect-train", "--config", "synthetic", "--out", str(blocker / "run"),
                                      "--iterations", "1", *cli_overrides(world)])
    assert result.exit_code == 2, result.output
    text = result.output  # stdout and stderr
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {blocker / 'run'}: cannot create output folder: Not a directory"], text
    assert "Traceback" not in text


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_with_one_error_line(tmp_path):
    world = make_world(tmp_path, train_images=16, val_images=1)
    out = tmp_path / "run"
    maskx = shutil.which("maskx") or str(Path(sys.executable).parent / "maskx")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASKX_CONSOLE_WIDTH": "200"}
    cmd = [maskx, "detect-train", "--config", "synthetic", "--out", str(out), "--iterations", "500",
           *cli_overrides(world, "solver.checkpoint_every=0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    stopped_at = load_checkpoint(out / "last.pth")["iteration"]
    assert errors[0].startswith(f"error: {out}: stopped by SIGTERM at iteration {stopped_at}; checkpoint saved")
    assert 2 <= stopped_at < 500
    assert len(metrics.read_text().splitlines()) == stopped_at  # log_every=1: every finished step, once
    assert not (out / "model_final.pth").exists()
