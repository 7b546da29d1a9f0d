"""A full disk during any write is one line naming the file, exit 2, the previous checkpoint intact, no temporary left.

Each writer is tested on a real full file system (a small tmpfs, where this machine lets the
tests mount one) and, everywhere, with the write patched to fail with ENOSPC as a full disk
makes it fail.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
import torch
from typer.testing import CliRunner

import pipelines.checkpoint as checkpoint_module
import pipelines.engine.run_dir as run_dir_module
from maskx_cli.main import app
from pipelines.config import MaskTrainConfig, SolverConfig, load_config
from pipelines.checkpoint import load_checkpoint
from pipelines.engine.loop import Trainer
from pipelines.errors import MaskxError
from pipelines.stages.cache import cache_build
from tests.engine.tiny_runs import cli_overrides, make_world

runner = CliRunner()
ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture
def small_disk(tmp_path):
    """``make(kib)`` mounts a tmpfs of that size and returns it; skips where mounting is not permitted."""
    mounted = []

    def make(kib: int):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root; the patched-writer variant of this test runs instead")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the patched-writer variant of this test runs instead")
        mounted.append(folder)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


class FullFile:
    """A file that takes ``budget`` bytes, then fails as a full disk does (OSError ENOSPC)."""

    def __init__(self, f, budget: int):
        self._f, self._left = f, budget

    def write(self, b) -> int:
        if len(b) > self._left:
            raise OSError(errno.ENOSPC, ENOSPC)
        self._left -= len(b)
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def patch_checkpoint_disk(monkeypatch, full_from_save: int, budget: int = 1000) -> None:
    """Checkpoint files from the ``full_from_save``-th on meet a full disk after ``budget`` bytes."""
    calls = {"n": 0}

    def fake_open(path, mode="r", **kw):
        calls["n"] += 1
        f = open(path, mode, **kw)
        return FullFile(f, budget) if calls["n"] >= full_from_save else f

    monkeypatch.setattr(checkpoint_module, "open", fake_open, raising=False)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def solver(**kw) -> SolverConfig:
    base = dict(iterations=8, warmup_iters=0, lr=0.01, batch_size=4, reference_batch_size=4, checkpoint_every=3,
                log_every=1, device="cpu")
    return SolverConfig(**{**base, **kw})


def regression_step(model):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 256, generator=g), torch.randn(16, 256, generator=g)
    return lambda it: {"loss_l2": ((model(x) - y) ** 2).mean()}


# -- checkpoints (torch.save raises RuntimeError "unexpected pos", not OSError) ------------------
@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_checkpoint_on_a_full_disk_keeps_the_previous_one(small_disk, tmp_path, monkeypatch, disk):
    # a 256x256 linear layer + SGD momentum: a checkpoint of ~0.5 MB; the second one does not fit beside the first
    if disk == "tmpfs":
        run = small_disk(800) / "run"
    else:
        run = tmp_path / "run"
        patch_checkpoint_disk(monkeypatch, full_from_save=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    trainer = Trainer(model, solver(), run, "test")
    with pytest.raises(MaskxError) as exc:
        trainer.run(regression_step(model))
    assert exc.value.line() == f"{run / 'last.pth'}: could not be written: {ENOSPC}"
    assert load_checkpoint(run / "last.pth")["iteration"] == 3  # the previous one, intact
    assert leftovers(run) == []


@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_detect_train_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk, tmp_path, monkeypatch, disk):
    """Was a 62-line traceback, exit 1, and a run folder without a checkpoint."""
    world = make_world(tmp_path, train_images=4, val_images=1)
    if disk == "tmpfs":
        root = small_disk(100)  # config, manifest, metrics fit; the first checkpoint (~240 kB) does not
    else:
        root = tmp_path / "disk"
        patch_checkpoint_disk(monkeypatch, full_from_save=1)
    out = root / "run"
    r = runner.invoke(app, ["detect-train", "--config", "synthetic", "--out", str(out), "--iterations", "2",
                            *cli_overrides(world, "solver.checkpoint_every=1")])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out / 'last.pth'}: could not be written: {ENOSPC}"], r.output
    assert "Traceback" not in r.output
    assert not out.exists()  # the failed run left nothing new


# -- metrics.jsonl and TensorBoard events -------------------------------------------------------
def fill(folder) -> None:
    """Take every free byte of ``folder``'s file system."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_logs_on_a_disk_that_fills_during_the_run(small_disk, capfd):
    run = small_disk(1000) / "run"
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def step(it: int):
        if it == 2:
            fill(run.parent)  # another job takes the disk
        return {"loss_l2": ((model(x) - y) ** 2).mean()}

    with pytest.raises(MaskxError) as exc:
        Trainer(model, solver(iterations=2000, checkpoint_every=0), run, "test").run(step)
    assert exc.value.line() in (f"{run / 'metrics.jsonl'}: could not be written: {ENOSPC}",
                                f"{run / 'tb'}: cannot write TensorBoard logs: {ENOSPC}")
    assert "Exception in thread" not in capfd.readouterr().err  # the event writer's thread prints nothing


@pytest.mark.parametrize("writer", ["metrics", "tensorboard"])
def test_each_log_on_a_full_disk_names_its_own_file(tmp_path, monkeypatch, writer):
    from torch.utils.tensorboard import SummaryWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, ENOSPC)

    if writer == "metrics":  # metrics.jsonl is appended to with open(..., "a")
        monkeypatch.setattr(run_dir_module, "open", lambda path, mode="r", **kw: full() if "a" in mode else open(path, mode, **kw),
                            raising=False)
        expected = f"{tmp_path / 'metrics.jsonl'}: could not be written: {ENOSPC}"
    else:
        monkeypatch.setattr(SummaryWriter, "add_scalar", full)
        expected = f"{tmp_path / 'tb'}: cannot write TensorBoard logs: {ENOSPC}"
    model = torch.nn.Linear(4, 1)
    x = torch.randn(8, 4)
    with pytest.raises(MaskxError) as exc:
        Trainer(model, solver(checkpoint_every=0), tmp_path, "test").run(lambda it: {"l": model(x).pow(2).mean()})
    assert exc.value.line() == expected


# -- embeddings, feature cache, pictures --------------------------------------------------------
def test_embeddings_on_a_full_disk(tiny_pipeline, small_disk):
    disk = small_disk(16)  # the tiny detector's embeddings take ~110 kB
    r = runner.invoke(app, ["export-embeddings", str(tiny_pipeline["detector"]), "--out", str(disk / "emb.h5")])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {disk / 'emb.h5'}: could not be written: {ENOSPC}"
    assert list(disk.iterdir()) == []


class FillingProgress:
    """A progress reporter whose first ``advance`` fills ``folder``'s disk (the cache was sized to fit first)."""

    def __init__(self, folder):
        self.folder, self.filled = folder, False

    def task(self, description, total):
        return self

    def advance(self, n=1, **fields):
        if not self.filled:
            self.filled = True
            fill(self.folder)

    def close(self):
        pass

    def log(self, message):
        pass


def test_feature_cache_on_a_disk_that_fills_while_it_is_built(tiny_pipeline, small_disk):
    disk = small_disk(16 * 1024)  # room for the cache's estimated size, so that building starts
    over = [o for o in tiny_pipeline["overrides"] if not o.startswith("detector.")]
    cfg = load_config(MaskTrainConfig, "synthetic", over + [f"cache.dir={disk}"], section="mask_train")
    with pytest.raises(MaskxError) as exc:
        cache_build(cfg, tiny_pipeline["detector"], FillingProgress(disk))
    assert exc.value.message == f"could not be written: {ENOSPC}"
    assert exc.value.path.startswith(str(disk / "features-")) and exc.value.path.endswith(".rows")  # the row file did not fit
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no partial cache, no temporary file


@pytest.mark.parametrize("disk", ["tmpfs", "patched"])
def test_pictures_on_a_full_disk(tiny_pipeline, tiny_world, small_disk, tmp_path, monkeypatch, disk):
    if disk == "tmpfs":
        out = small_disk(12) / "pred"
    else:
        from PIL import Image

        out = tmp_path / "pred"

        def full(self, fp, *args, **kwargs):
            raise OSError(errno.ENOSPC, ENOSPC)

        monkeypatch.setattr(Image.Image, "save", full)
    r = runner.invoke(app, ["predict", str(tiny_world.val_dir), "--mask", str(tiny_pipeline["runs"]["transfer"]),
                            "--out", str(out), "--visualize", "--scale", "4", "--score-thresh", "0"])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}/") and errors[0].endswith(
        f".png: could not be written: {ENOSPC}"), r.output
    assert "Traceback" not in r.output and leftovers(out) == []
