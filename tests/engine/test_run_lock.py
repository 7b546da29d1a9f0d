"""Two runs into one output folder: the second is refused with one line naming the folder; the first is untouched."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from maskx_cli.main import app
from pipelines.checkpoint import load_checkpoint
from pipelines.engine.run_dir import RUN_LOCK, MetricsLog, read_manifest, run_lock
from tests.engine.tiny_runs import HEAD

BUSY = "another run is writing this folder now: wait for it to end, or choose another output folder"


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_second_mask_train_into_a_folder_being_written_is_refused(tiny_pipeline, tmp_path, monkeypatch):
    """Was: both exited 0; config and manifest described one run, the checkpoint held the other's weights."""
    out = tmp_path / "run"
    p = tiny_pipeline

    def mask_train(seed: int):
        sets = [a for item in [*HEAD, f"solver.seed={seed}"] for a in ("--set", item)]
        return CliRunner().invoke(app, ["mask-train", "--detector", str(p["detector"]), "--embeddings", str(p["embeddings"]),
                                        "--out", str(out), "--iterations", "2", *sets])

    second = {}
    real_write = MetricsLog.write

    def write_then_start_another(self, **record):  # the second run starts while the first is training
        real_write(self, **record)
        if not second:
            second["result"] = mask_train(seed=7)

    monkeypatch.setattr(MetricsLog, "write", write_then_start_another)
    first = mask_train(seed=0)
    assert first.exit_code == 0, first.output
    refused = second["result"]
    assert refused.exit_code == 2, refused.output
    assert error_lines(refused) == [f"error: {out}: {BUSY}"]
    assert "Traceback" not in refused.output
    # the folder is the first run's alone, and its lock is gone with it
    assert yaml.safe_load((out / "config.yaml").read_text())["solver"]["seed"] == 0
    assert load_checkpoint(out / "mask_final.pth", "mask")["config"]["solver"]["seed"] == 0
    assert read_manifest(out)["status"] == "finished"
    assert not (out / RUN_LOCK).exists()


COMMANDS = {
    "detect-train": ["detect-train", "--config", "synthetic", "--iterations", "1"],
    "mask-train": ["mask-train", "--config", "synthetic", "--detector", "det", "--embeddings", "emb.h5", "--iterations", "1"],
    "train": ["train", "--config", "synthetic", "--iterations", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("resume", [False, True])
def test_every_training_command_refuses_a_folder_another_run_holds(tmp_path, command, resume):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("stage: detect-train\n")  # the other run's files
    with run_lock(out):
        result = CliRunner().invoke(app, [*COMMANDS[command], "--out", str(out), *(["--resume"] if resume else [])])
    assert result.exit_code == 2, result.output
    assert error_lines(result) == [f"error: {out}: {BUSY}"]
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # untouched; the lock went with its holder
    assert (out / "config.yaml").read_text() == "stage: detect-train\n"


def test_a_lock_left_by_a_killed_process_blocks_no_one(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = ("import fcntl, os, signal, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", holder, str(out / RUN_LOCK)])
    assert r.returncode == -signal.SIGKILL and (out / RUN_LOCK).is_file()  # killed holding it: the file stays
    with run_lock(out):
        assert (out / RUN_LOCK).is_file()
    assert not (out / RUN_LOCK).exists()
