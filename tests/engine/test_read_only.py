"""Output on a read-only disk, or in a folder without write permission: one line naming the folder, exit 2.

Where this machine lets the tests mount a tmpfs, the disk is a real read-only one; everywhere, the
same is tested with the file system calls under the folder patched to fail as a read-only disk (or
a folder without write permission) makes them fail. Tests run as root in some places, where a
folder's missing write bit stops nothing: there the patch is what makes it read-only.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipelines.engine.loop as loop_module
from maskx_cli.main import app
from pipelines.checkpoint import load_checkpoint
from pipelines.engine.run_dir import RUN_LOCK, MetricsLog
from tests.engine.tiny_runs import cli_overrides, make_world

EROFS = os.strerror(errno.EROFS)  # "Read-only file system"
EACCES = os.strerror(errno.EACCES)  # "Permission denied"


def patch_read_only(monkeypatch, folder: Path, err: int = errno.EROFS) -> None:
    """From now on every creation, write, rename or removal under ``folder`` fails with ``err``."""
    top = os.path.abspath(folder)

    def inside(p) -> bool:
        p = os.path.abspath(os.fsdecode(p))
        return p == top or p.startswith(top + os.sep)

    def refuse(p):
        raise OSError(err, os.strerror(err), os.fsdecode(p))

    def guard(real, writes=lambda *a, **k: True):
        def call(p, *a, **k):
            if not isinstance(p, int) and inside(p) and writes(*a, **k):
                refuse(p)
            return real(p, *a, **k)
        return call

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    monkeypatch.setattr(os, "open", guard(os.open, lambda flags, *a, **k: bool(flags & write_flags)))
    writes_mode = lambda mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    monkeypatch.setattr(builtins, "open", guard(builtins.open, writes_mode))
    monkeypatch.setattr(io, "open", guard(io.open, writes_mode))
    for name in ("unlink", "remove", "rmdir", "mkdir", "replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


@pytest.fixture
def read_only_mount(tmp_path):
    """``make()`` mounts a tmpfs and returns it; ``freeze(folder)`` makes it read-only. Skips where mounting is not permitted."""
    mounted = []

    def make() -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root; the patched variant of this test runs instead")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(folder)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the patched variant of this test runs instead")
        mounted.append(folder)
        return folder

    def freeze(folder: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)

    make.freeze = freeze
    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


COMMANDS = {
    "detect-train": ["detect-train", "--config", "synthetic", "--iterations", "1"],
    "mask-train": ["mask-train", "--config", "synthetic", "--detector", "det", "--embeddings", "emb.h5", "--iterations", "1"],
    "train": ["train", "--config", "synthetic", "--iterations", "1"],
    "detect-import": ["detect-import", "--data", "ann.json"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("disk", ["mounted read-only", "patched read-only", "no write permission"])
def test_read_only_output_folder_is_one_line_naming_it(read_only_mount, tmp_path, monkeypatch, command, disk):
    if disk == "mounted read-only":
        out = read_only_mount()
        read_only_mount.freeze(out)
    else:
        out = tmp_path / "out"
        out.mkdir()
        if disk == "no write permission":
            out.chmod(stat.S_IRUSR | stat.S_IXUSR)  # enough where tests do not run as root
        patch_read_only(monkeypatch, out, errno.EROFS if disk == "patched read-only" else errno.EACCES)
    for run in (out, out / "new" / "run"):  # the folder itself, and one to be created in it
        result = CliRunner().invoke(app, [*COMMANDS[command], "--out", str(run)])
        problem = "cannot write here" if run == out else "cannot create output folder"
        reason = EACCES if disk == "no write permission" else EROFS
        assert result.exit_code == 2, result.output
        assert error_lines(result) == [f"error: {run}: {problem}: {reason}"], result.output
        assert "Traceback" not in result.output
    if disk == "no write permission":
        out.chmod(stat.S_IRWXU)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("when", ["after the first checkpoint", "before any checkpoint"])
@pytest.mark.parametrize("disk", ["mounted", "patched"])
def test_disk_turning_read_only_mid_run_is_one_line(read_only_mount, tmp_path, monkeypatch, disk, when):
    world = make_world(tmp_path, train_images=4, val_images=1)
    folder = read_only_mount() if disk == "mounted" else tmp_path / "disk"
    folder.mkdir(exist_ok=True)
    out = folder / "run"
    owner, name = (loop_module, "save_checkpoint") if when == "after the first checkpoint" else (MetricsLog, "write")
    real = getattr(owner, name)

    def then_freeze(*args, **kwargs):  # the disk turns read-only right after the first checkpoint, or the first metrics line
        real(*args, **kwargs)
        if disk == "mounted":
            read_only_mount.freeze(folder)
        else:
            patch_read_only(monkeypatch, folder)

    monkeypatch.setattr(owner, name, then_freeze)
    result = CliRunner().invoke(app, ["detect-train", "--config", "synthetic", "--out", str(out), "--iterations", "4",
                                      *cli_overrides(world, "solver.checkpoint_every=2")])
    monkeypatch.undo()
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)  # the first write that met the read-only disk: metrics or TensorBoard events
    assert line in (f"error: {out / 'metrics.jsonl'}: could not be written: {EROFS}",
                    f"error: {out / 'tb'}: cannot write TensorBoard logs: {EROFS}"), result.output
    assert "Traceback" not in result.output
    assert not (out / "model_final.pth").exists()
    if when == "after the first checkpoint":
        assert load_checkpoint(out / "last.pth")["iteration"] == 2
    else:  # what the run wrote cannot be removed from a read-only disk: it stays, with no checkpoint
        assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK, "config.yaml", "manifest.json", "metrics.jsonl", "recipe.yaml", "tb"]
